"""A file shorter than its own header or index says is refused as truncated, never stored in part, in every
reader (issue 17, item 1): each small valid file here is cut at many lengths, and no cut is read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers import probe

BUILDERS = {f.name: f for f in probe.formats() if not f.name.startswith("tiff")}  # TIFF: test_tiff_pages.py


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_no_cut_of_a_file_is_read(tmp_path: Path, name: str) -> None:
    fmt = BUILDERS[name]
    (tmp_path / "src").mkdir()
    original = fmt.build(tmp_path / "src" / f"scan{fmt.suffix}")
    data = original.read_bytes()
    work = tmp_path / "cut"
    work.mkdir()
    for f in original.parent.iterdir():  # an export's images come along whole
        if f != original:
            (work / f.name).write_bytes(f.read_bytes())
    cut = work / original.name
    step = max(1, len(data) // 400)
    read = []
    with probe.quiet():
        for n in sorted({*range(1, len(data), step), *range(max(1, len(data) - 24), len(data))}):
            cut.write_bytes(data[:n])
            try:
                read_volume(cut, max_voxels=probe.MAX_VOXELS)
            except ReadError as e:
                assert "\n" not in str(e) and cut.name in str(e)
                continue
            read.append(n)
    assert not read, f"{name}: cuts at {read[:10]} of {len(data)} bytes were read"


def test_npy_with_a_second_array_appended_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "two.npy"
    with path.open("wb") as fh:
        np.save(fh, probe.SMALL)
        np.save(fh, probe.SMALL)  # np.load would read the first and say nothing
    with pytest.raises(ReadError, match="bytes after the array its header describes"):
        read_volume(path)


def test_animated_png_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "anim.png"
    frames = [Image.fromarray(b) for b in probe.SMALL]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ReadError, match=r"PNG image of 3 frames"):
        read_volume(path)


def test_a_png_name_is_decoded_only_as_png_or_jpeg(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "actually.png"
    Image.fromarray(probe.SMALL[0]).save(path, format="BMP")
    with pytest.raises(ReadError, match="neither PNG nor JPEG"):
        read_volume(path)
