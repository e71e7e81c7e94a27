"""Preprocessing of archive volumes, Dask-parallel over B-scans.

Per volume: the intensity-normalised image (``derived/normalized``) and, for annotated B-scans, the
U-Net border-weight maps (``derived/weights``). The Dask graph maps pure functions of :mod:`octseg.unet`
over shard-aligned blocks of B-scans and stores straight into the Zarr arrays, so no two tasks write
into one shard. Each output carries a fingerprint of its inputs and parameters, written last; a
rerun skips outputs whose fingerprint still matches.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from octseg.tasks.archive.store import open_archive
from octseg.tasks.preprocess.fingerprints import NORMALIZATION_METHOD, expected_fingerprints
from octseg.tasks.runtime.retry import TRANSIENT_IO_RETRIES
from octseg.unet.config import WeightMapConfig
from octseg.unet.normalize import normalize_volume
from octseg.unet.weights import border_weight_map

__all__ = ["NORMALIZATION_METHOD", "PreprocessResult", "derived_fingerprints", "expected_fingerprints", "outdated",
           "preprocess_volume", "preprocess_volume_task"]


@dataclass
class PreprocessResult:
    volume_id: str
    computed: list[str] = field(default_factory=list)  # derived arrays written in this run
    skipped: list[str] = field(default_factory=list)  # derived arrays already up to date


def _normalize_block(block: np.ndarray) -> np.ndarray:
    """(k, Y, X) raw B-scans -> (k, Y, X) float32 normalised B-scans."""
    return normalize_volume(np.asarray(block))


def _weights_block(labels: np.ndarray, annotated: np.ndarray, w0: float, sigma: float, class_weights) -> np.ndarray:
    """(k, Y, X) labels + (k, 1, 1) annotated flags -> border-weight maps; 0 on unannotated B-scans."""
    out = np.zeros(labels.shape, dtype=np.float32)
    for i in np.flatnonzero(annotated.reshape(-1)):
        out[i] = border_weight_map(labels[i], w0=w0, sigma=sigma, class_weights=class_weights)
    return out


def _store(result, target, scheduler_address: str | None) -> None:
    """Compute ``result`` (a Dask array or a list) into the Zarr array(s) ``target`` on the Dask cluster
    (threads when no address; this thread inside a Dask worker, whose slots the cluster already counts)."""
    import dask
    import dask.array as da

    stored = da.store(result, target, lock=False, compute=False)
    if scheduler_address is None:
        dask.compute(stored, scheduler="synchronous" if _in_worker() else "threads")
        return
    from octseg.tasks.runtime.cluster import client_for

    future = client_for(scheduler_address).compute(stored)  # one client per process, shared by the tasks
    for f in future if isinstance(future, list) else [future]:
        f.result()


def derived_fingerprints(archive, volume_id: str, weights: WeightMapConfig) -> dict[str, dict]:
    """The fingerprint each derived array of ``volume_id`` must carry to be up to date: ``normalized``
    always, ``weights`` when the volume has manual labels."""
    meta = archive.volume_meta(volume_id)
    labels_fp = archive.labels_fingerprint(volume_id, meta)  # None: not annotated
    return expected_fingerprints(meta.get("source_sha256"), labels_fp, weights, manual=labels_fp is not None)


def outdated(archive, volume_id: str, weights: WeightMapConfig) -> list[str]:
    """Names of the derived arrays of ``volume_id`` that preprocessing would (re)compute."""
    return [name for name, fp in derived_fingerprints(archive, volume_id, weights).items()
            if not archive.derived_is_current(volume_id, name, fp)]


def _in_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def preprocess_volume(
    archive_path: str | Path,
    volume_id: str,
    scheduler_address: str | None = None,
    weights: WeightMapConfig = WeightMapConfig(),
    spread: str = "blocks",
) -> PreprocessResult:
    """Write ``derived/normalized`` and (when annotated) ``derived/weights`` for one volume.

    With a ``scheduler_address``, ``spread="blocks"`` spreads the volume's shard-aligned blocks over the
    cluster's workers (one large volume), ``spread="volume"`` runs the whole volume as one task on one
    worker (many volumes: nothing but a submit is left to this process, which on a small machine shares
    the cores with the workers)."""
    if scheduler_address and spread == "volume":
        from octseg.tasks.runtime.cluster import client_for

        future = client_for(scheduler_address).submit(preprocess_volume, str(archive_path), volume_id, None, weights,
                                                      pure=False, key=f"preprocess-{volume_id}-{uuid.uuid4().hex}")
        return future.result()
    import dask.array as da

    archive = open_archive(archive_path, create=False)
    image = archive.image(volume_id)  # (Z, Y, X)
    shard_z = archive.shard_bscans(volume_id)
    fps = derived_fingerprints(archive, volume_id, weights)
    todo = outdated(archive, volume_id, weights)
    if todo:
        archive.check_whole(volume_id)
    result = PreprocessResult(volume_id, skipped=[name for name in fps if name not in todo])
    jobs: dict[str, tuple] = {}  # name -> (blocks to compute, target array)
    if "normalized" in todo:  # read shard-sized blocks directly: no rechunk tasks, no transfers between workers
        src = da.from_zarr(image, chunks=(shard_z, -1, -1))
        out = archive.create_derived(volume_id, "normalized", "float32", {"method": NORMALIZATION_METHOD})
        jobs["normalized"] = (src.map_blocks(_normalize_block, dtype=np.float32), out)
    if "weights" in todo:
        labels, annotated = archive.manual_labels(volume_id)
        lab = da.from_zarr(labels, chunks=(shard_z, -1, -1))
        flags = np.zeros((image.shape[0], 1, 1), dtype=bool)
        flags[annotated] = True
        flags_da = da.from_array(flags, chunks=(shard_z, 1, 1))
        maps = da.map_blocks(_weights_block, lab, flags_da, weights.w0, weights.sigma, weights.class_weights,
                             dtype=np.float32)
        out = archive.create_derived(volume_id, "weights", "float32", {"w0": weights.w0, "sigma": weights.sigma})
        jobs["weights"] = (maps, out)
    if jobs:  # one graph for both arrays: their blocks spread over the workers together
        _store([blocks for blocks, _ in jobs.values()], [out for _, out in jobs.values()], scheduler_address)
    for name in jobs:  # each marked complete only after every block of it is stored
        archive.mark_derived_complete(volume_id, name, fps[name])
        result.computed.append(name)
    return result


@task(name="preprocess-volume", task_run_name="preprocess-{volume_id}", **TRANSIENT_IO_RETRIES)
def preprocess_volume_task(archive_path: str, volume_id: str, scheduler_address: str | None,
                           weights: WeightMapConfig, spread: str = "blocks") -> PreprocessResult:
    """Prefect wrapper of :func:`preprocess_volume`; a failing volume fails this task run with its error."""
    result = preprocess_volume(archive_path, volume_id, scheduler_address, weights, spread)
    get_run_logger().info("%s: computed %s, up to date %s", volume_id, result.computed or "-", result.skipped or "-")
    return result
