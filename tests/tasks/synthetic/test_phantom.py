"""Tests of tasks.phantom: deterministic synthetic OCT volumes and the files written from them."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

import octseg.tasks.synthetic.phantom as phantom
from octseg.tasks.synthetic.phantom import FILL_VALUE, FLUID_LAYERS, LAYER_NAMES, make_phantom_bscan, make_phantom_volume, Phantom, write_phantom_files


@pytest.fixture(scope="module")
def default_volume() -> Phantom:
    return make_phantom_volume()


def touching_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (a, b), a < b, of instances in an (H, W) map that are 4-neighbours somewhere."""
    pairs = set()
    for a, b in ((instances[1:], instances[:-1]), (instances[:, 1:], instances[:, :-1])):
        touch = (a > 0) & (b > 0) & (a != b)
        pairs |= {(min(p, q), max(p, q)) for p, q in zip(a[touch], b[touch])}
    return pairs


def arrays(p: Phantom) -> list[np.ndarray]:
    return [p.image, p.layers, p.fluid, p.fluid_instances]


def test_deterministic_from_seed():
    a, b = make_phantom_volume(n_bscans=3, seed=5), make_phantom_volume(n_bscans=3, seed=5)
    c = make_phantom_volume(n_bscans=3, seed=6)
    for x, y in zip(arrays(a), arrays(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.layers, c.layers)


@pytest.mark.parametrize(
    "n_bscans, height, width",
    [
        (8, 128, 192),  # default
        (1, 32, 32),  # smallest allowed, single B-scan
        (3, 65, 97),  # odd sizes
        (2, 256, 384),  # larger than default: pockets scale with the size
    ],
)
def test_shapes_and_dtypes(n_bscans, height, width):
    p = make_phantom_volume(n_bscans, height, width, seed=1)
    expected = {"image": np.uint8, "layers": np.uint8, "fluid": np.uint8, "fluid_instances": np.int32}
    for name, dtype in expected.items():
        arr = getattr(p, name)
        assert arr.shape == (n_bscans, height, width) and arr.dtype == dtype, name
    assert set(np.unique(p.fluid)) <= {0, 1}
    assert p.layers.max() <= len(LAYER_NAMES) - 1
    np.testing.assert_array_equal(p.fluid, (p.fluid_instances > 0).astype(np.uint8))


def test_layers_ordered_top_to_bottom(default_volume):
    """Each column goes vitreous (0) -> retina (1..7) -> choroid (8), never back up."""
    assert (np.diff(default_volume.layers.astype(int), axis=1) >= 0).all()
    assert (default_volume.layers[:, 0] == 0).all() and (default_volume.layers[:, -1] == 8).all()


def test_foveal_dip(default_volume):
    """The ILM is deepest near the fovea in the middle B-scan: a dip of several pixels."""
    ilm = (default_volume.layers == 0).sum(axis=1)  # (Z, W): first retinal row per column
    middle = ilm[len(ilm) // 2]
    assert middle.max() - np.median(middle) >= 5


def test_fluid_darker_than_tissue(default_volume):
    p = default_volume
    retina = (p.layers >= 1) & (p.layers <= 7)
    fluid = p.fluid == 1
    assert fluid.sum() > 0
    assert p.image[fluid].mean() < 0.5 * p.image[retina & ~fluid].mean()
    # also darker than its immediate surroundings (INL/ONL, the darkest tissue around it)
    ring = np.stack([ndimage.binary_dilation(f, iterations=3) & ~f & r for f, r in zip(fluid, retina)])
    assert p.image[fluid].mean() < 0.5 * p.image[ring].mean()


def test_fluid_inside_retina(default_volume):
    p = default_volume
    assert set(np.unique(p.layers[p.fluid == 1])) <= set(FLUID_LAYERS)


def test_most_bscans_have_fluid_of_reasonable_size(default_volume):
    p = default_volume
    assert (p.fluid.sum(axis=(1, 2)) > 0).mean() >= 0.5
    sizes = np.bincount(p.fluid_instances.ravel())[1:]
    sizes = sizes[sizes > 0]
    assert sizes.min() >= 6 and sizes.max() <= 25 * 25  # pockets 6-25 px across at 128 x 192


def test_instances_unique_within_volume(default_volume):
    ids = [set(np.unique(b)) - {0} for b in default_volume.fluid_instances]
    all_ids = [i for s in ids for i in s]
    assert len(all_ids) == len(set(all_ids))


def test_touching_fluid_instances_exist(default_volume):
    pairs = [touching_pairs(b) for b in default_volume.fluid_instances]
    assert sum(len(p) for p in pairs) >= 1
    # touching pockets merge in the binary mask: fewer connected components than instances
    b = next(i for i, p in enumerate(pairs) if p)
    _, n_components = ndimage.label(default_volume.fluid[b])
    assert n_components < len(np.unique(default_volume.fluid_instances[b])) - 1


def test_white_fill_in_a_top_corner(default_volume):
    p = default_volume
    corners = p.image[:, 0, [0, -1]]  # (Z, 2) top-left and top-right pixels
    assert (corners == FILL_VALUE).any(axis=1).all()
    fill = p.image == FILL_VALUE
    assert (p.layers[fill] == 0).all()  # only in the vitreous
    assert not fill[:, p.image.shape[1] // 2].any()  # only in the top half


@pytest.mark.parametrize(
    "fill, left, right",
    [
        ("left", True, False),  # top-left only
        ("right", False, True),  # top-right only
        ("both", True, True),  # both corners
        ("none", False, False),  # no fill: 255 never occurs
    ],
)
def test_bscan_fill_corners(fill, left, right):
    b = make_phantom_bscan(64, 96, np.random.default_rng(0), fill=fill)
    assert b.image.shape == (64, 96)
    assert (b.image[0, 0] == FILL_VALUE) == left and (b.image[0, -1] == FILL_VALUE) == right
    if fill == "none":
        assert b.image.max() < FILL_VALUE


def test_no_fluid_when_disabled():
    p = make_phantom_volume(n_bscans=3, seed=2, fluid=False)
    assert p.fluid.sum() == 0 and p.fluid_instances.sum() == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_phantom_volume(n_bscans=0), "n_bscans must be an int >= 1, got 0"),  # empty volume
        (lambda: make_phantom_volume(height=31), "height must be an int >= 32 pixels, got 31"),  # too small
        (lambda: make_phantom_bscan(64, 64, np.random.default_rng(0), fill="top"), "fill must be one of"),
        (lambda: make_phantom_bscan(64, 64, np.random.default_rng(0), fovea=2.0), "fovea=2.0"),
        (lambda: write_phantom_files("/nonexistent", fmt="jpeg"), "fmt must be one of"),  # unknown format
    ],
)
def test_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


SMALL = dict(n_volumes=2, n_bscans=3, height=48, width=64, seed=3)


def test_write_tiff_round_trip(tmp_path):
    paths = write_phantom_files(tmp_path, fmt="tiff", **SMALL)
    assert [p.name for p in paths] == ["phantom_000.tif", "phantom_001.tif"]
    for i, path in enumerate(paths):
        p = make_phantom_volume(3, 48, 64, seed=3 + i)
        np.testing.assert_array_equal(tifffile.imread(path), p.image)
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels" / path.name), p.fluid * 255)


def test_write_png_round_trip(tmp_path):
    paths = write_phantom_files(tmp_path, fmt="png", **SMALL)
    assert [p.name for p in paths] == ["phantom_000", "phantom_001"]
    for i, path in enumerate(paths):
        p = make_phantom_volume(3, 48, 64, seed=3 + i)
        names = sorted(f.name for f in path.iterdir())
        assert names == ["bscan_000.png", "bscan_001.png", "bscan_002.png"]
        assert sorted(f.name for f in (tmp_path / "labels" / path.name).iterdir()) == names
        for z, name in enumerate(names):
            np.testing.assert_array_equal(np.asarray(Image.open(path / name)), p.image[z])
            label = np.asarray(Image.open(tmp_path / "labels" / path.name / name))
            np.testing.assert_array_equal(label, p.fluid[z] * 255)


def test_write_npy_round_trip_and_determinism(tmp_path):
    first = write_phantom_files(tmp_path / "a", fmt="npy", **SMALL)
    second = write_phantom_files(tmp_path / "b", fmt="npy", **SMALL)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.load(a), np.load(b))
        labels = np.load(a.parent / "labels" / a.name)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    np.testing.assert_array_equal(np.load(first[0]), make_phantom_volume(3, 48, 64, seed=3).image)


def test_module_imports_standalone_without_prefect():
    """Loads tasks/synthetic/phantom.py by path (not via the tasks package) and checks prefect stays unloaded."""
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('phantom', {phantom.__file__!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "print(sorted(m for m in ('prefect', 'mlflow', 'dask', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tiff_phantoms_carry_their_voxel_size_into_the_reader(tmp_path):
    from octseg.tasks.synthetic.phantom import VOXEL_SIZE_UM
    from octseg.tasks.readers.registry import read_volume

    (path,) = write_phantom_files(tmp_path, n_volumes=1, fmt="tiff", n_bscans=3, height=64, width=96)
    volume = read_volume(path)
    assert volume.scale_um == VOXEL_SIZE_UM
    assert volume.image.shape == (3, 64, 96)
