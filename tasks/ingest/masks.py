"""Manual masks of a source: where they lie beside it, and reading them as labels of its volume.

A file's mask is ``<labels_dir>/<file name>``; a folder of B-scans has one mask per B-scan (see
:func:`mask_files`). What the values mean is decided for the whole volume, never file by file:

- values 0..31 are class labels and are kept as they are (a mask of 0 and 2 stays 0 and 2);
- a mask of one bright value is binary, 0/1, on where it is at least half its brightest: 0/255, 0/65535,
  or a lossy or smoothed file of one (near-black and near-white shades, with at most 5% of its lit
  pixels in between);
- a colour mask is judged by its grey levels when R = G = B, else it is binary when it is one colour
  (each bright pixel has the same bright channels, however lossy);
- anything else is refused with the mask file named: NaN or infinite values, negative or fractional
  values, several grey levels above 31, several colours, or a volume mixing binary 0/255 masks with
  class labels above 1.

Masks are read by the same readers as scans (:func:`octseg.tasks.readers.images.read_pixels`), with
the same refusals.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from octseg.tasks.readers.base import ReadError, ScanVolume, matches_suffix
from octseg.tasks.readers.images import PIXEL_READERS, read_pixels, was_turned
from octseg.tasks.readers.registry import source_files, unsupported_suffix

__all__ = ["MAX_LABEL", "mask_files", "read_masks", "unmatched_masks"]

MAX_LABEL = 31  # masks with values 0..31 keep them (class labels); binary (bright) masks become 0/1


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


def unmatched_masks(labels_dir: str | Path, source: str | Path) -> list[str]:
    """Files of a folder source's own masks folder (``labels_dir/<folder name>``) that name none of its
    B-scans (a typo, another case or another suffix): they would be left out without a word."""
    base = Path(labels_dir) / Path(source).name
    if not Path(source).is_dir() or not base.is_dir():
        return []
    names = {f.name for f in source_files(source)}
    return sorted(f.name for f in base.iterdir() if f.is_file() and not f.name.startswith(".") and f.name not in names)


MIDDLE_SHARE = 0.05  # a binary mask: at most this share of its lit pixels between dark and bright (lossy edges)


def _bright(level: np.ndarray, labels_possible: bool = True) -> np.ndarray | None:
    """Where a mask of one bright value is on, or None when ``level`` is not such a mask: its lit pixels
    are bright (over a tenth of the brightest; on from half of it), apart from at most
    :data:`MIDDLE_SHARE` of them below nine tenths, and its faint nonzero pixels lie within a JPEG block
    (8 px) of lit ones: the edges and ringing of a lossy or smoothed file, never regions of small class
    labels beside a bright one (0, 1, 2 and 255 for "ignore" is refused)."""
    top = float(level.max())
    lit = level > 0.1 * top
    if top == 0 or (labels_possible and top <= MAX_LABEL) or (lit & (level < 0.9 * top)).sum() > MIDDLE_SHARE * lit.sum():
        return None
    faint = (level > 0) & ~lit
    if faint.any():
        near = ndimage.maximum_filter(lit, size=(1,) * (lit.ndim - 2) + (17, 17))
        if (faint & ~near).any():
            return None
    return level >= 0.5 * top


def _kind(arr: np.ndarray, colour: bool, path: Path) -> tuple[str, np.ndarray]:
    """("classes", values kept) or ("binary", foreground mask) for one mask file; refusals name it."""
    if arr.size == 0:
        raise ReadError(path, f"empty mask of shape {arr.shape}")
    if arr.dtype == bool:
        return "classes", arr.astype(np.uint8)
    if colour:
        if arr.shape[-1] in (2, 4) and np.all(arr[..., -1] == arr[..., -1].max(initial=0)):
            arr = arr[..., :-1]  # an opaque alpha channel says nothing
        if np.all(arr == arr[..., :1]):  # grey drawn in RGB (or all black): judged as grey values
            arr = arr[..., 0]
        else:
            level = arr.max(axis=-1)
            on = _bright(level, labels_possible=False)
            # which channels are bright in each bright pixel: one pattern for one colour, apart from the
            # few that a lossy file's colour subsampling shifts at the edges
            counts = np.unique(arr[on] >= 0.5 * level[on][:, None], axis=0, return_counts=True)[1] \
                if on is not None else np.zeros(1)
            if on is None or counts.max() < (1 - MIDDLE_SHARE) * counts.sum():
                raise ReadError(path, f"colour mask of several colours or shades: octseg cannot tell which colour is "
                                      f"which class; store class labels 0..{MAX_LABEL} in a grey or palette image")
            return "binary", on
    if not np.all(np.isfinite(arr)):
        raise ReadError(path, "mask holds NaN or infinite values")
    values = np.unique(arr)
    if values[0] < 0 or not np.all(values == np.round(values)):
        raise ReadError(path, f"mask holds negative or fractional values ({values[0]}..{values[-1]}); "
                              f"class labels are integers 0..{MAX_LABEL}")
    if values[-1] <= MAX_LABEL:
        return "classes", arr.astype(np.uint8)
    on = _bright(arr)
    if on is not None:
        return "binary", on
    raise ReadError(path, f"mask is neither binary nor small-integer labels (0..{MAX_LABEL}): "
                          f"{values.size} distinct values in {values[0]}..{values[-1]}")


def _labels(kinds: list[tuple[str, np.ndarray]], paths: list[Path]) -> list[np.ndarray]:
    """One volume's masks as labels: binary ones as 0/1, refused when others of it hold classes above 1."""
    binary = [p for (k, _), p in zip(kinds, paths) if k == "binary"]
    classes = [(a.max(initial=0), p) for (k, a), p in zip(kinds, paths) if k == "classes"]
    top, where = max(classes, key=lambda t: t[0], default=(0, None))
    if binary and top > 1:
        raise ReadError(binary[0], f"a binary mask (0 and one bright value) in a volume whose mask {where.name} "
                                   f"holds class labels up to {top}: store every mask of a volume one way")
    return [a.astype(np.uint8) for _, a in kinds]


def _read_mask(path: Path, shape: tuple[int, ...], image_name: str, image_turned: bool) -> tuple[str, np.ndarray]:
    """One mask file as (kind, values) of exactly ``shape`` (a 2-D mask fits a one-B-scan volume), turned
    by an Orientation tag exactly when its image was (else the labels would not lie on the pixels)."""
    if not any(matches_suffix(r, path) for r in PIXEL_READERS):
        raise unsupported_suffix(path)
    said: list[str] = []
    arr, colour = read_pixels(path, keep_palette=True, warnings=said)
    if was_turned(said) != image_turned:
        raise ReadError(path, f"{image_name} is {'' if image_turned else 'not '}turned by an Orientation tag and this "
                              f"mask is {'' if was_turned(said) else 'not'}: its labels would not lie on the pixels; "
                              f"store the image and its mask the same way")
    kind, labels = _kind(arr, colour, path)
    if len(shape) == 3 and shape[0] == 1 and labels.ndim == 2:
        labels = labels[np.newaxis]
    if labels.shape != tuple(shape):
        raise ReadError(path, f"mask shape {labels.shape} does not match image shape {tuple(shape)} of {image_name}")
    return kind, labels


def read_masks(labels_dir: str | Path, volume: ScanVolume) -> tuple[np.ndarray, list[int]] | None:
    """Masks of ``volume`` as (Z, Y, X) uint8 plus the annotated B-scans; None when it has none.

    B-scans without a mask file are unannotated: 0, and not listed. See :func:`mask_files`.
    """
    found = mask_files(labels_dir, volume.source)
    if not found:
        return None
    turned = was_turned(volume.warnings)
    if not volume.source.is_dir():
        (labels,) = _labels([_read_mask(found[0], volume.image.shape, volume.source.name, turned)], [found[0]])
        return labels, list(range(volume.image.shape[0]))
    paths = [found[z] for z in sorted(found)]
    read = _labels([_read_mask(found[z], volume.image.shape[1:], volume.files[z].name, turned) for z in sorted(found)],
                   paths)
    labels = np.zeros(volume.image.shape, dtype=np.uint8)
    for z, mask in zip(sorted(found), read):
        labels[z] = mask
    return labels, sorted(found)
