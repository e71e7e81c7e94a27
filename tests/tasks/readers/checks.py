"""What every vendor reader test shares: the real exports (when ../shared/data is present), the checks
every vendor volume must pass, and the synthetic volumes written into synthetic files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.registry import source_sha256

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
WILLIS = ("heidelberg_vol", "Willis_B_716_{}.vol")
XML = ("heyex_eyepy_tests", "heyex_xml", "test_dummy.xml")
RNG = np.random.default_rng(11)
VOL8 = RNG.integers(0, 256, (3, 20, 30), dtype=np.uint8)
VOL16 = RNG.integers(0, 4000, (3, 20, 30), dtype=np.uint16)


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available at {p}")
    return p


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    elif obj is not None:
        yield str(obj)


def assert_no_phi(vol) -> None:
    """meta is JSON and holds none of the identifiers (an export's birth date may equal its exam date)."""
    text, leaves = json.dumps(vol.meta), set(_leaves(vol.meta))
    for key, value in vol.identifiers.items():
        if "birth" in key.lower() and value == vol.meta.get("acquired"):
            continue
        assert value not in leaves, (key, value)
        assert len(value) < 4 or value.lower() not in text.lower(), (key, value)


def assert_common(vol, path: Path, reader: str) -> None:
    assert vol.reader == reader and vol.meta["format"] == reader and vol.source == path
    assert vol.sha256 == source_sha256(path) and path in vol.files
    assert vol.image.ndim == 3 and vol.image.dtype in (np.uint8, np.uint16, np.float32)
    assert vol.meta["scan_pattern"] in ("volume", "line", "circle", "radial", "unknown")
    for rows in vol.layers.values():
        assert rows.dtype == np.float32 and rows.shape == (vol.image.shape[0], vol.image.shape[2])
        assert not np.isnan(rows).all()
    assert_no_phi(vol)


def half(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst
