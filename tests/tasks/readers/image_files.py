"""Tiny image files for the reader and mask tests: a random uint8 stack, written as PNGs or a folder of them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

RNG = np.random.default_rng(7)
STACK = (RNG.random((3, 20, 30)) * 250).astype(np.uint8)  # (Z, Y, X)
U16 = STACK.astype(np.uint16) * 200
GREY = {"photometric": "minisblack"}  # else tifffile stores a (3, Y, X) array as planar RGB


def png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def bscan_folder(path: Path, stack: np.ndarray = STACK, names: list[str] | None = None) -> Path:
    path.mkdir()
    for name, bscan in zip(names or [f"b_{i}.png" for i in range(len(stack))], stack, strict=True):
        png(path / name, bscan)
    return path
