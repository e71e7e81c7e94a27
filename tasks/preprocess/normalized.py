"""The network's input as preprocessing left it: normalised B-scans of a volume, from the archive.

``derived/normalized`` when preprocessing completed it, else the raw B-scans normalised now with the
same function (logged), so training, evaluation and inference always see the same input.
"""
from __future__ import annotations

import logging

import numpy as np

from octseg.unet.normalize import normalize_volume

__all__ = ["bscan_reader", "normalized_bscans"]

log = logging.getLogger(__name__)


def normalized_bscans(archive, volume_id: str, idx: list[int] | None = None) -> np.ndarray:
    """Normalised B-scans ``idx`` (all when None) of a volume, float32 (n, H, W).

    Reads ``derived/normalized`` when preprocessing completed it, else normalises the raw B-scans
    now with the same function (logged), so training and inference always see the same input.
    """
    pick = slice(None) if idx is None else idx
    if archive.derived_is_complete(volume_id, "normalized"):
        derived = archive.open_derived(volume_id, "normalized")
        archive.check_whole(volume_id, derived, "normalised image")
        return np.asarray(derived.get_orthogonal_selection((pick,)), dtype=np.float32)
    log.warning("%s: no normalised image in the archive; normalising on the fly (run preprocess)", volume_id)
    archive.check_whole(volume_id)
    return normalize_volume(np.asarray(archive.image(volume_id).get_orthogonal_selection((pick,))))


def bscan_reader(archive, volume_id: str):
    """``read(z0, z1)`` -> normalised float32 B-scans of a volume, from ``derived/normalized`` when
    preprocessing completed it, else normalised on the fly with the same function (logged once)."""
    if archive.derived_is_complete(volume_id, "normalized"):
        derived = archive.open_derived(volume_id, "normalized")
        archive.check_whole(volume_id, derived, "normalised image")
        return lambda z0, z1: np.asarray(derived[z0:z1], dtype=np.float32)
    log.info("%s: no normalised image in the archive; normalising on the fly (run preprocess)", volume_id)
    archive.check_whole(volume_id)
    image = archive.image(volume_id)
    return lambda z0, z1: normalize_volume(np.asarray(image[z0:z1]))
