"""The label classes: their default names and their colours, defined once.

Dependency-free, so both the archive (OME ``image-label`` colours) and the QC pictures (NumPy + Pillow
only) import it, and the two agree by construction. Class 0 (background) is transparent; class
``c > 0`` gets ``CLASS_COLORS[(c - 1) % 6 + 1]``, i.e. the palette cycles past class 6.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["CLASS_COLORS", "DEFAULT_CLASS_NAMES", "class_names_of", "palette_color"]

# Class value -> name of the binary fluid task the U-Net is trained for.
DEFAULT_CLASS_NAMES: Mapping[int, str] = MappingProxyType({0: "background", 1: "fluid"})

# Label colours, class value -> (R, G, B); class 0 has none (transparent).
CLASS_COLORS: Mapping[int, tuple[int, int, int]] = MappingProxyType({
    1: (255, 0, 0),  # fluid
    2: (0, 200, 0),
    3: (0, 90, 255),
    4: (255, 200, 0),
    5: (255, 0, 255),
    6: (0, 220, 220),
})


def palette_color(value: int) -> tuple[int, int, int]:
    """Palette colour of class ``value`` > 0: ``CLASS_COLORS``, cycling past class 6."""
    return CLASS_COLORS[(value - 1) % len(CLASS_COLORS) + 1]


def class_names_of(n_classes: int, class_names: Mapping[int, str] = DEFAULT_CLASS_NAMES) -> dict[int, str]:
    """A name for each of ``n_classes`` classes (``class<k>`` where none is known)."""
    return {c: class_names.get(c, f"class{c}") for c in range(n_classes)}
