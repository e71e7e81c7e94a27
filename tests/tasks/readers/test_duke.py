"""Duke DME .mat files, MATLAB v5 and v7.3 (synthetic)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers import vendor_files as vf
from tests.tasks.readers.checks import assert_common, half


@pytest.mark.parametrize("grader", [1, 2])
@pytest.mark.parametrize("write", [vf.write_mat5, vf.write_mat73], ids=["v5", "v7.3"])
def test_duke_mat(tmp_path: Path, write, grader: int) -> None:
    arrays = vf.duke_arrays()
    p = write(tmp_path / "Subject_01.mat", arrays)
    vol = read_volume(p, options={"grader": grader})
    assert_common(vol, p, "duke-mat")
    np.testing.assert_array_equal(vol.image, np.moveaxis(arrays["images"], -1, 0))
    assert vol.image.dtype == np.uint8 and vol.image.shape == (4, 12, 10) and vol.scale_um is None
    fluid = np.moveaxis(arrays[f"manualFluid{grader}"], -1, 0)
    assert vol.annotated == ([1, 2, 3] if grader == 1 else [0, 2])
    assert vol.manual_labels.dtype == np.uint8 and vol.manual_labels.shape == vol.image.shape
    np.testing.assert_array_equal(vol.manual_labels[vol.annotated], fluid[vol.annotated] > 0)
    assert set(np.unique(vol.manual_labels)) <= {0, 1}
    assert list(vol.layers) == ["ILM", "NFL/GCL", "IPL/INL", "INL/OPL", "OPL/ONL", "ISM/ISE", "OS/RPE", "BM"]
    assert vol.layers_source == f"grader {grader}"
    layers = arrays[f"manualLayers{grader}"]
    for i, rows in enumerate(vol.layers.values()):
        np.testing.assert_array_equal(rows, layers[i].T.astype(np.float32) - 1)  # 1-based -> 0-based
    assert np.isnan(vol.layers["INL/OPL"][:, :2]).all()


def test_duke_mat_without_nan_takes_the_bscans_with_layers_as_annotated(tmp_path: Path) -> None:
    """Should a file mark unannotated B-scans with 0 instead of NaN, the grader's layers tell them apart."""
    arrays = vf.duke_arrays()
    fluid = arrays["manualFluid1"]
    fluid[:, :, 0] = 0  # B-scan 0: not annotated (its layers are NaN) but 0, not NaN
    vol = read_volume(vf.write_mat5(tmp_path / "zeros.mat", arrays))
    assert vol.annotated == [1, 2, 3]
    assert any("no NaN" in w for w in vol.warnings)
    fluid[:, :, 0] = 0
    fluid[0, 0, 0] = 2  # fluid drawn on a B-scan without layers: annotated after all
    assert read_volume(vf.write_mat5(tmp_path / "fluid.mat", arrays)).annotated == [0, 1, 2, 3]


@pytest.mark.parametrize("write", [vf.write_mat5, vf.write_mat73], ids=["v5", "v7.3"])
@pytest.mark.parametrize(("images", "phrase"), [
    (np.ones((12, 10, 4), np.complex128) + 1j, "complex128"),
    (np.ones(5, np.uint8), "'images' is [12]-D uint8 of shape \\((1, )?5"),  # MATLAB has no 1-D: v5 gives 1 x 5
    (np.ones((2, 3, 4, 5), np.uint8), "'images' is 4-D"),
])
def test_duke_mat_images_that_are_not_a_volume_are_refused(tmp_path: Path, write, images, phrase) -> None:
    """Through read_volume, as ingest reads: the imaginary part is never dropped silently, 1-D or 4-D
    images are never taken for a volume, with or without the graders' masks beside them."""
    from octseg.tasks.readers.registry import read_volume

    for arrays in ({"images": images}, {**vf.duke_arrays(), "images": images}):
        with pytest.raises(ReadError, match=phrase):
            read_volume(write(tmp_path / "bad.mat", arrays))


@pytest.mark.parametrize("write", [vf.write_mat5, vf.write_mat73], ids=["v5", "v7.3"])
def test_duke_mat_errors(tmp_path: Path, write) -> None:
    arrays = vf.duke_arrays()
    bare = read_volume(write(tmp_path / "bare.mat", {"images": arrays["images"]}))
    assert bare.manual_labels is None and bare.annotated == [] and bare.layers == {}
    with pytest.raises(ReadError, match="no 'images' variable"):
        read_volume(write(tmp_path / "noimg.mat", {"manualFluid1": arrays["manualFluid1"]}))
    full = write(tmp_path / "full.mat", arrays)
    with pytest.raises(ReadError, match=r"images of 12 x 10 x 4 = 480 voxels exceeds the limit of 100"):
        read_volume(full, max_voxels=100)
    with pytest.raises(ReadError, match="grader must be 1 or 2"):
        read_volume(full, options={"grader": 3})
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(full, tmp_path / "cut.mat"))
