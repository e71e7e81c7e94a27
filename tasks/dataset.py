"""Annotated B-scans of an archive -> in-memory training and validation sets."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tasks.archive import open_archive
from unet.data import BScanSet
from unet.normalize import normalize_volume

__all__ = ["load_annotated", "split_train_val", "load_training_data"]

log = logging.getLogger(__name__)


def load_annotated(archive_path: str | Path, volume_id: str) -> BScanSet | None:
    """The annotated B-scans of one volume: normalised images, labels and border-weight maps.

    Uses ``derived/normalized`` and ``derived/weights`` when preprocessing wrote them, else computes
    normalisation on the fly and uses uniform weights (logged). None when nothing is annotated.
    """
    archive = open_archive(archive_path, create=False)
    manual = archive.manual_labels(volume_id)
    if manual is None or not manual[1]:
        return None
    labels, annotated = manual
    idx = sorted(annotated)
    norm = archive.open_derived(volume_id, "normalized")
    if norm is not None and archive.derived_is_complete(volume_id, "normalized"):
        images = np.stack([norm[z] for z in idx]).astype(np.float32)
    else:
        log.warning("%s: no normalised image in the archive; normalising on the fly (run preprocess)", volume_id)
        images = normalize_volume(np.stack([archive.image(volume_id)[z] for z in idx]))
    weights = archive.open_derived(volume_id, "weights")
    w = None
    if weights is not None and archive.derived_is_complete(volume_id, "weights"):
        w = np.stack([weights[z] for z in idx]).astype(np.float32)
    return BScanSet(images, np.stack([labels[z] for z in idx]).astype(np.int64), w)


def _concat(sets: list[BScanSet]) -> BScanSet:
    shapes = {s.images.shape[1:] for s in sets}
    if len(shapes) > 1:
        raise ValueError(f"annotated B-scans differ in shape {sorted(shapes)}; train on volumes of one shape")
    weights = None
    if all(s.weights is not None for s in sets):
        weights = np.concatenate([s.weights for s in sets])
    return BScanSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]), weights)


def split_train_val(sets: dict[str, BScanSet], val_fraction: float, seed: int = 0) -> tuple[BScanSet, BScanSet | None]:
    """Hold out whole volumes when there are several (no leakage between neighbouring B-scans);
    with a single volume, hold out a fraction of its B-scans."""
    if not sets:
        raise ValueError("no annotated B-scans in the selected volumes; ingest with --labels first")
    rng = np.random.default_rng(seed)
    ids = sorted(sets)
    if val_fraction == 0:
        return _concat([sets[i] for i in ids]), None
    if len(ids) > 1:
        n_val = max(1, round(val_fraction * len(ids)))
        val_ids = set(rng.permutation(ids)[:n_val].tolist())
        train = _concat([sets[i] for i in ids if i not in val_ids])
        return train, _concat([sets[i] for i in ids if i in val_ids])
    only = sets[ids[0]]
    if len(only) < 2:
        return only, None
    order = rng.permutation(len(only))
    n_val = max(1, round(val_fraction * len(only)))
    pick = lambda ix: BScanSet(only.images[ix], only.labels[ix], None if only.weights is None else only.weights[ix])  # noqa: E731
    return pick(np.sort(order[n_val:])), pick(np.sort(order[:n_val]))


def load_training_data(
    archive_path: str | Path, volume_ids: list[str], val_fraction: float, seed: int = 0
) -> tuple[BScanSet, BScanSet | None]:
    """Load every annotated volume and split it into training and validation sets."""
    sets = {v: s for v in volume_ids if (s := load_annotated(archive_path, v)) is not None}
    return split_train_val(sets, val_fraction, seed)

