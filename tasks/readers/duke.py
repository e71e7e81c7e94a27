"""Duke DME ``.mat`` files (Chiu et al. 2015): B-scans with two graders' fluid masks and layers (SciPy, h5py).

MATLAB v5 files are read with ``scipy.io`` after their element lengths are checked; v7.3 files are
HDF5, read with h5py (axes reversed back to MATLAB order). The reader option ``grader`` (1 or 2, default
1) picks whose manual labels and layers the volume carries. Tested on synthetic v5 and v7.3 files and
on the real data set.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from octseg.tasks.readers.base import ExportReader, Limits, ReadError, ScanVolume, check_voxels, one_line
from octseg.tasks.readers.headers import boundary_layers, floats_as_float32, new_volume

__all__ = ["MAT", "DukeMatReader"]


class DukeMatReader(ExportReader):
    name, suffixes, label = "duke-mat", (".mat",), "Duke .mat"
    option_fields = {"grader": (int, Field(1, ge=1, le=2, strict=True,
                                           description="Whose manual fluid labels a Duke .mat gives: 1 or 2."))}

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        return _read_duke_mat(path, limits.max_voxels, options.get("grader", self.option_defaults["grader"]))


MAT = DukeMatReader()


_DUKE_LAYERS = ["ILM", "NFL/GCL", "IPL/INL", "INL/OPL", "OPL/ONL", "ISM/ISE", "OS/RPE", "BM"]  # eyepy's names


def _read_duke_mat(path: Path, max_voxels: int | None, grader: Any) -> ScanVolume:
    """Chiu et al. 2015 DME ``.mat``: ``images`` (Y, X, Z), ``manualFluid{g}`` (Y, X, Z) with NaN on
    B-scans grader g did not annotate, ``manualLayers{g}`` (8, X, Z) MATLAB (1-based) rows."""
    if grader not in (1, 2):
        raise ReadError(path, f"grader must be 1 or 2, not {grader!r}")
    import h5py

    wanted = ["images", f"manualFluid{grader}", f"manualLayers{grader}"]
    arrays = _mat73(path, wanted, max_voxels) if h5py.is_hdf5(str(path)) else _mat5(path, wanted, max_voxels)
    images = arrays["images"]
    if images.ndim not in (2, 3) or min(images.shape[:2]) < 2 or 0 in images.shape or images.dtype.kind not in "buif":
        raise ReadError(path, f"'images' is {images.ndim}-D {images.dtype} of shape {images.shape}: expected "
                              f"a (rows, columns, B-scans) array of real numbers")
    image = np.ascontiguousarray(np.moveaxis(images if images.ndim == 3 else images[..., None], -1, 0))
    meta: dict[str, Any] = {"laterality": None, "scan_pattern": "volume" if image.shape[0] > 1 else "line",
                            "acquired": None, "device": None,
                            "layer_rows": "0-based (the file's MATLAB 1-based rows minus 1)"}
    warnings = ["a Duke .mat file carries no voxel size (Chiu 2015 gives about 123 x 3.87 x 11.3 µm)"]
    labels, annotated = None, []
    fluid = arrays.get(f"manualFluid{grader}")
    if fluid is not None:
        fluid = np.moveaxis(fluid if fluid.ndim == 3 else fluid[..., None], -1, 0)
        if fluid.shape != image.shape:
            raise ReadError(path, f"manualFluid{grader} of shape {fluid.shape} does not match images {image.shape}")
        fluid = fluid.astype(np.float32, copy=False)
        annotated = [z for z in range(fluid.shape[0]) if not np.isnan(fluid[z]).all()]
        labels = np.ascontiguousarray(np.nan_to_num(fluid, nan=0.0) > 0).astype(np.uint8)
    layers = _duke_layers(path, arrays.get(f"manualLayers{grader}"), image.shape)
    if fluid is not None and not np.isnan(fluid).any() and layers:
        # no NaN marks the unannotated B-scans: those the grader drew layers on are the annotated ones
        drawn = sorted({z for rows in layers.values() for z in np.flatnonzero(~np.isnan(rows).all(axis=1))})
        if drawn and len(drawn) < fluid.shape[0]:
            annotated = [int(z) for z in drawn]
            unmarked = sorted(set(range(fluid.shape[0])) - set(annotated))
            if labels[unmarked].any():  # fluid drawn where no layers are: keep every B-scan with fluid
                annotated = sorted(set(annotated) | {int(z) for z in unmarked if labels[z].any()})
            warnings.append(f"manualFluid{grader} marks no B-scan as unannotated (no NaN): the {len(annotated)} "
                            f"B-scans with grader {grader}'s layers (or fluid) are taken as annotated")
    return new_volume(floats_as_float32(image), None, layers=layers, layers_source=f"grader {grader}" if layers else None,
                   meta=meta, manual_labels=labels, annotated=annotated, warnings=warnings)


def _duke_layers(path: Path, arr: np.ndarray | None, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    if arr is None:
        return {}
    arr = arr if arr.ndim == 3 else arr[..., None]  # (n, X, Z)
    if arr.shape[1:] != (shape[2], shape[0]):
        raise ReadError(path, f"layer array of shape {arr.shape} does not match {shape[0]} B-scans "
                              f"of {shape[2]} A-scans")
    names = _DUKE_LAYERS if arr.shape[0] == len(_DUKE_LAYERS) else [f"layer_{i}" for i in range(arr.shape[0])]
    return boundary_layers((name, arr[i].T.astype(np.float32) - 1) for i, name in enumerate(names))


def _check_duke_shapes(path: Path, shapes: dict[str, tuple[int, ...]], wanted: list[str],
                       max_voxels: int | None) -> None:
    """``shapes``: every variable's (MATLAB-order) shape; those ``wanted`` are checked against the limit."""
    if "images" not in shapes:
        listed = ", ".join(sorted(shapes)[:10]) or "none"
        raise ReadError(path, f"no 'images' variable: not a Duke DME .mat file (variables: {listed})")
    for name in wanted:
        if name in shapes:
            check_voxels(path, shapes[name], max_voxels, name)


def _mat5(path: Path, wanted: list[str], max_voxels: int | None) -> dict[str, np.ndarray]:
    import scipy.io

    with path.open("rb") as fh:
        head = fh.read(128)
    if not head.startswith(b"MATLAB 5.0 MAT-file") or head[126:128] not in (b"IM", b"MI"):
        raise ReadError(path, f"not a MATLAB v5 or v7.3 .mat file (starts {head[:19]!r})")
    _mat5_check_length(path, "<" if head[126:128] == b"IM" else ">")
    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
        _check_duke_shapes(path, shapes, wanted, max_voxels)
        loaded = scipy.io.loadmat(path, variable_names=[k for k in wanted if k in shapes])
    except ReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ReadError(path, f"truncated or corrupt .mat file ({one_line(e)})") from e
    return {k: np.asarray(loaded[k]) for k in wanted if k in loaded}


def _mat5_check_length(path: Path, endian: str) -> None:
    """Every top-level data element (8-byte tag: type, length) must end inside the file."""
    size, pos = path.stat().st_size, 128
    with path.open("rb") as fh:
        while pos < size:
            fh.seek(pos)
            tag = fh.read(8)
            if len(tag) < 8:
                raise ReadError(path, f"truncated .mat file (a partial element header at byte {pos:,})")
            mtype, nbytes = struct.unpack(endian + "2I", tag)
            pos += 8 + nbytes + (-nbytes % 8 if mtype != 15 else 0)  # miCOMPRESSED (15) is not padded
            if pos > size + 7:
                raise ReadError(path, f"truncated .mat file (an element needs {pos:,} bytes, the file has {size:,})")


def _mat73(path: Path, wanted: list[str], max_voxels: int | None) -> dict[str, np.ndarray]:
    """MATLAB v7.3 (HDF5): h5py gives the axes reversed, so each array is transposed back to MATLAB order."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ReadError(path, f"truncated or corrupt MATLAB v7.3 (HDF5) file ({one_line(e)})") from e
    with f:
        found = {k: d for k, d in f.items() if isinstance(d, h5py.Dataset)}
        _check_duke_shapes(path, {k: tuple(reversed(d.shape)) for k, d in found.items()}, wanted, max_voxels)
        found = {k: found[k] for k in wanted if k in found}
        return {k: np.asarray(d[()]).T for k, d in found.items()}
