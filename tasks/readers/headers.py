"""What the vendor readers read from headers alike: voxel sizes, dates, laterality, identifiers, layers, grey levels.

Used by the vendor format modules of this package (never by plain image readers): values that a header
gives in its own units or encodings come out in the :class:`~octseg.tasks.readers.base.ScanVolume`'s
(micrometres, ISO dates, ``OD``/``OS``, (Z, X) float32 boundary rows with NaN for none).
"""
from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks.readers.base import ReadError, ScanVolume, luminance

__all__ = ["add_identifier", "boundary_layers", "floats_as_float32", "grey", "iso_date", "laterality", "new_volume",
           "positive", "scale_um"]

_SINGLE = "none (single B-scan)"
_PLACEHOLDERS = {"", "unknown", "none", "n/a"}  # eyepy's defaults for unset .vol strings


def positive(v: Any) -> bool:
    """Whether ``v`` is a finite number > 0 (a usable size in a header)."""
    try:
        return math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        return False


def scale_um(z_mm: Any, y_mm: Any, x_mm: Any, nz: int, meta: dict, warnings: list[str],
             single: bool = False) -> tuple[float, float, float] | None:
    """(z, y, x) in micrometres from sizes in mm; one B-scan (or non-parallel ones) take x for z."""
    if not (positive(y_mm) and positive(x_mm)):
        warnings.append(f"invalid pixel size in the header (y={y_mm!r} mm, x={x_mm!r} mm): no voxel size")
        return None
    if nz == 1 or single:
        meta["z_spacing"] = _SINGLE if nz == 1 else "none (B-scans are not parallel)"
        z_mm = x_mm
    elif not positive(z_mm):
        warnings.append(f"invalid B-scan spacing in the header ({z_mm!r} mm): no voxel size")
        return None
    return (float(z_mm) * 1000, float(y_mm) * 1000, float(x_mm) * 1000)


def laterality(value: Any) -> str | None:
    """``OD`` or ``OS`` from a header's R/L/OD/OS (NUL-padded, any case); None otherwise."""
    text = str(value or "").strip().strip("\0").upper()
    return {"R": "OD", "OD": "OD", "L": "OS", "OS": "OS"}.get(text)


def iso_date(value: Any) -> str | None:
    """'YYYY-MM-DD' from a date, datetime, ISO string or DICOM DA/DT string; None if not a real date."""
    if isinstance(value, (dt.date, dt.datetime)):
        value = value.isoformat()
    text = str(value or "").strip()
    m = re.match(r"(\d{4})-?(\d{2})-?(\d{2})", text)
    if not m:
        return None
    try:
        day = dt.date(*map(int, m.groups()))
    except ValueError:
        return None
    return day.isoformat() if day.year > 1900 else None  # 1899-12-30 / 1601-01-01: epoch = unset


def add_identifier(ids: dict[str, str], key: str, value: Any) -> None:
    """Record an identifying value; empty values, zeros and placeholders are dropped."""
    if value is None or (isinstance(value, (int, float)) and value == 0):
        return
    text = " ".join(str(value).replace("\0", " ").split())
    if text.lower() in _PLACEHOLDERS:
        return
    if key in ids and ids[key] != text:
        key = next(f"{key}.{i}" for i in range(2, 1000) if f"{key}.{i}" not in ids or ids[f"{key}.{i}"] == text)
    ids[key] = text


def boundary_layers(named: Iterable[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """name -> (Z, X) float32, values >= 3e38 (Heidelberg's "none") as NaN; all-NaN layers dropped."""
    out = {}
    for name, arr in named:
        a = np.array(arr, dtype=np.float32)
        a[~(a < 3.0e38)] = np.nan
        if not np.isnan(a).all():
            out[name] = a
    return out


def floats_as_float32(arr: np.ndarray) -> np.ndarray:
    """Real floats as float32; anything else as stored: integers get their exact archive type from the
    caller, which refuses complex, object and string arrays with a line naming the file."""
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


def grey(arr: np.ndarray, path: Path, what: str, warnings: list[str] | None = None) -> np.ndarray:
    """A 2-D image from grey or RGB(A) pixels (:func:`~octseg.tasks.readers.base.luminance`: equal channels
    kept, else luminance, and ``warnings`` hears of it)."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ReadError(path, f"{what} has shape {arr.shape}: not a grey or RGB image")
    return luminance(arr, what, warnings)


def new_volume(image: np.ndarray, scale: tuple[float, float, float] | None, **fields: Any) -> ScanVolume:
    """A ScanVolume whose reader, source, sha256 and files :class:`~octseg.tasks.readers.base.ExportReader` fills in."""
    return ScanVolume(image=image, scale_um=scale, reader="", source=Path(), sha256="", **fields)
