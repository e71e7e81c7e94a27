"""Annotated B-scans of an archive -> in-memory training and validation sets."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from octseg.tasks.archive.store import open_archive
from octseg.tasks.preprocess.normalized import normalized_bscans
from octseg.unet.bscans import BScanSet

__all__ = [
    "checked", "load_annotated", "load_training_data", "load_volume_sets", "source_digests", "split_train_val"]

log = logging.getLogger(__name__)


def load_annotated(archive_path: str | Path, volume_id: str) -> BScanSet | None:
    """The annotated B-scans of one volume: normalised images, labels and border-weight maps.

    Weight maps come from ``derived/weights`` when preprocessing wrote them (else ``weights`` is
    None). None when nothing is annotated.
    """
    archive = open_archive(archive_path, create=False)
    manual = archive.manual_labels(volume_id)
    if manual is None or not manual[1]:
        return None
    labels, annotated = manual
    idx = sorted(annotated)
    images = normalized_bscans(archive, volume_id, idx)
    w = None
    if archive.derived_is_complete(volume_id, "weights"):
        w = np.asarray(archive.open_derived(volume_id, "weights").get_orthogonal_selection((idx,)), dtype=np.float32)
    return BScanSet(images, np.asarray(labels.get_orthogonal_selection((idx,))).astype(np.int64), w)


def _fill_missing_weights(sets: dict[str, BScanSet]) -> dict[str, BScanSet]:
    """Uniform weights for volumes without weight maps when others have them (logged per volume)."""
    missing = [v for v, s in sets.items() if s.weights is None]
    if not missing or len(missing) == len(sets):
        return sets
    log.warning("no border-weight maps for %s (run preprocess); they train with uniform weights", missing)
    return {v: s if s.weights is not None else BScanSet(s.images, s.labels, np.ones_like(s.images))
            for v, s in sets.items()}


def _concat(sets: list[BScanSet]) -> BScanSet:
    """One set from several of the same B-scan shape (checked by :func:`split_train_val`)."""
    weights = None
    if all(s.weights is not None for s in sets):
        weights = np.concatenate([s.weights for s in sets])
    return BScanSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]), weights)


def checked(sets: dict[str, BScanSet]) -> dict[str, BScanSet]:
    """The annotated volumes, when there are any and their B-scans share one shape (ValueError otherwise),
    with uniform weights where some volumes lack weight maps."""
    if not sets:
        raise ValueError("no annotated B-scans in the selected volumes; ingest with --labels first")
    shapes = {v: s.images.shape[1:] for v, s in sets.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"annotated B-scans differ in shape {shapes}; train on volumes of one shape (--volume)")
    return _fill_missing_weights(sets)


def load_volume_sets(archive_path: str | Path, volume_ids: Sequence[str]) -> dict[str, BScanSet]:
    """The annotated B-scans of each volume (volumes without any left out), :func:`checked`."""
    return checked({v: s for v in volume_ids if (s := load_annotated(archive_path, v)) is not None})


def source_digests(archive_path: str | Path, volume_ids: Sequence[str]) -> dict[str, str | None]:
    """Volume id -> the SHA-256 of the file it was ingested from (None when unknown): what a registered model
    records of the volumes that trained it, so ``evaluate`` knows them in any archive. ValueError when two of
    the volumes hold the same scan (an archive from before ingest refused copies, or one scan under two
    graders' masks): training would see it twice, and could validate or score out of fold on a scan it
    trained on."""
    entries = open_archive(archive_path, create=False).catalogue().entries(list(volume_ids))
    digests = {v: entries[v].source_sha256 for v in volume_ids}
    holders: dict[str, list[str]] = {}
    for v, sha in digests.items():
        if sha:
            holders.setdefault(sha, []).append(v)
    twins = [sorted(ids) for ids in holders.values() if len(ids) > 1]
    if twins:
        listed = "; ".join(" and ".join(repr(v) for v in ids) for ids in twins)
        raise ValueError(f"{archive_path}: volumes {listed} hold the same scan (the same source bytes): train on one "
                         f"of them (name the volumes to train on with --volume)")
    return digests


def split_train_val(sets: dict[str, BScanSet], val_fraction: float, seed: int,
                    val_volumes: Sequence[str] | None = None) -> tuple[BScanSet, BScanSet | None]:
    """Hold out whole volumes when there are several (no leakage between neighbouring B-scans): the
    ``val_volumes`` named, else a random ``val_fraction`` of them; with a single volume, hold out a
    fraction of its B-scans."""
    sets = checked(sets)
    rng = np.random.default_rng(seed)
    ids = sorted(sets)
    if val_volumes:
        named = set(val_volumes)
        if named - set(ids):
            raise ValueError(f"validation volume(s) {sorted(named - set(ids))} are not annotated training volumes "
                             f"of this selection ({ids})")
        if not set(ids) - named:
            raise ValueError("every selected volume is a validation volume; nothing left to train on")
        return _concat([sets[i] for i in ids if i not in named]), _concat([sets[i] for i in ids if i in named])
    if val_fraction == 0:
        return _concat([sets[i] for i in ids]), None
    if len(ids) > 1:
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))  # keep a volume to train on
        val_ids = set(rng.permutation(ids)[:n_val].tolist())
        train = _concat([sets[i] for i in ids if i not in val_ids])
        return train, _concat([sets[i] for i in ids if i in val_ids])
    only = sets[ids[0]]
    if len(only) < 2:
        return only, None
    order = rng.permutation(len(only))
    n_val = min(len(only) - 1, max(1, round(val_fraction * len(only))))
    pick = lambda ix: BScanSet(only.images[ix], only.labels[ix], None if only.weights is None else only.weights[ix])  # noqa: E731
    return pick(np.sort(order[n_val:])), pick(np.sort(order[:n_val]))


def load_training_data(
    archive_path: str | Path, volume_ids: list[str], val_fraction: float, seed: int,
    val_volumes: Sequence[str] | None = None,
) -> tuple[BScanSet, BScanSet | None]:
    """Load every annotated volume and split it into training and validation sets."""
    return split_train_val(load_volume_sets(archive_path, volume_ids), val_fraction, seed, val_volumes)

