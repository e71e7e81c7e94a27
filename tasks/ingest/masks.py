"""Manual masks of a source: where they lie beside it, and reading them as labels of its volume.

A file's mask is ``<labels_dir>/<file name>``; a folder of B-scans has one mask per B-scan (see
:func:`mask_files`). Binary masks (one nonzero value, or any nonzero colour) become 0/1; masks of
small integers 0..31 keep their values as class labels. Masks are read by the same readers as scans
(:func:`octseg.tasks.readers.images.read_pixels`), with the same refusals.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from octseg.tasks.readers.base import ReadError, ScanVolume, matches_suffix
from octseg.tasks.readers.images import PIXEL_READERS, read_pixels
from octseg.tasks.readers.registry import source_files, unsupported_suffix

__all__ = ["MAX_LABEL", "mask_files", "read_masks"]

MAX_LABEL = 31  # masks with values 0..31 keep them (class labels); binary masks become 0/1


def mask_files(labels_dir: str | Path, source: str | Path) -> dict[int, Path]:
    """Existing mask files of a source, by B-scan index (a file source: index 0 = the whole stack).

    A file's mask is ``labels_dir/<file name>``. A folder's masks are
    ``labels_dir/<folder name>/<B-scan file name>`` when that sub-folder exists, else
    ``labels_dir/<B-scan file name>``.
    """
    labels_dir, source = Path(labels_dir), Path(source)
    if not source.is_dir():
        mask = labels_dir / source.name
        return {0: mask} if mask.is_file() else {}
    base = labels_dir / source.name if (labels_dir / source.name).is_dir() else labels_dir
    found = {z: base / f.name for z, f in enumerate(source_files(source))}
    return {z: m for z, m in found.items() if m.is_file()}


def _to_labels(arr: np.ndarray, colour: bool, path: Path) -> np.ndarray:
    """Binary masks (one nonzero value, or any nonzero colour channel) -> 0/1; 0..31 kept; else error."""
    if colour:
        return np.any(arr != 0, axis=-1).astype(np.uint8)
    values = np.unique(arr)
    if arr.dtype == bool or (values.size <= 2 and (values.size < 2 or values[0] == 0)):
        return (arr != 0).astype(np.uint8)
    if values[0] >= 0 and values[-1] <= MAX_LABEL and np.all(values == np.round(values)):
        return arr.astype(np.uint8)
    raise ReadError(path, f"mask is neither binary nor small-integer labels (0..{MAX_LABEL}): "
                          f"{values.size} distinct values in {values[0]}..{values[-1]}")


def _read_mask(path: Path, shape: tuple[int, ...], image_name: str) -> np.ndarray:
    """One mask file as labels of exactly ``shape`` (a 2-D mask fits a one-B-scan volume)."""
    if not any(matches_suffix(r, path) for r in PIXEL_READERS):
        raise unsupported_suffix(path)
    arr, colour = read_pixels(path, keep_palette=True)
    labels = _to_labels(arr, colour, path)
    if len(shape) == 3 and shape[0] == 1 and labels.ndim == 2:
        labels = labels[np.newaxis]
    if labels.shape != tuple(shape):
        raise ReadError(path, f"mask shape {labels.shape} does not match image shape {tuple(shape)} of {image_name}")
    return labels


def read_masks(labels_dir: str | Path, volume: ScanVolume) -> tuple[np.ndarray, list[int]] | None:
    """Masks of ``volume`` as (Z, Y, X) uint8 plus the annotated B-scans; None when it has none.

    B-scans without a mask file are unannotated: 0, and not listed. See :func:`mask_files`.
    """
    found = mask_files(labels_dir, volume.source)
    if not found:
        return None
    if not volume.source.is_dir():
        return _read_mask(found[0], volume.image.shape, volume.source.name), list(range(volume.image.shape[0]))
    labels = np.zeros(volume.image.shape, dtype=np.uint8)
    for z, path in sorted(found.items()):
        labels[z] = _read_mask(path, volume.image.shape[1:], volume.files[z].name)
    return labels, sorted(found)
