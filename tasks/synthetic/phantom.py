"""Synthetic retinal OCT phantoms that look like Spectralis B-scans, deterministic from a seed.

A phantom B-scan (H rows = depth, W columns = lateral position) has, top to bottom:

======  ============  =====================================================
class   name          appearance
======  ============  =====================================================
0       vitreous      dark, above the retina
1       RNFL          bright; thins out towards the fovea
2       GCL+IPL       medium; thins out towards the fovea
3       INL           dark; thins out towards the fovea
4       OPL           medium-bright; thins out towards the fovea
5       ONL           dark; slightly thicker at the fovea
6       EZ            bright (ellipsoid zone / IS-OS junction)
7       RPE           brightest
8       choroid       textured, fading with depth to the bottom of the image
======  ============  =====================================================

Layer boundaries are smooth random curves on a bowl-shaped RPE; the inner layers thin out at the fovea,
which makes the foveal dip. The image is the class reflectivity times multiplicative gamma speckle,
slightly blurred, plus a Rayleigh noise floor, scaled to uint8 and capped at 254, so that the value
255 only occurs in the white fill: a triangle in one or both top corners (inside the vitreous), as in
registered or rotated Spectralis exports. Retinal vessels near the ILM cast vertical shadows.

Fluid pockets (intraretinal cysts) are dark ellipses clipped to layers 2..5 (GCL+IPL to ONL); some
come in pairs that share a border, the touching instances the U-Net's border weights separate.
``layers`` ignores fluid (it is the tissue the pocket sits in); ``fluid`` marks it separately.

Pure NumPy/SciPy/tifffile/Pillow; no Prefect here, so the module imports standalone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "VOXEL_SIZE_UM",
    "write_ome_tiff",
    "FILL_VALUE",
    "FLUID_LAYERS",
    "FORMATS",
    "LAYER_NAMES",
    "Phantom",
    "make_phantom_bscan",
    "make_phantom_volume",
    "write_phantom_files",
]

log = logging.getLogger(__name__)

LAYER_NAMES: tuple[str, ...] = ("vitreous", "RNFL", "GCL+IPL", "INL", "OPL", "ONL", "EZ", "RPE", "choroid")
FLUID_LAYERS: tuple[int, ...] = (2, 3, 4, 5)  # fluid pockets lie in GCL+IPL .. ONL
FILL_VALUE = 255  # the white fill; tissue is capped at 254
# nominal (z, y, x) voxel size in micrometres written into phantom TIFFs: B-scan spacing, depth, A-scan
# spacing of a Spectralis-like raster (the phantom is a smaller B-scan of the same field of view)
VOXEL_SIZE_UM: tuple[float, float, float] = (120.0, 15.0, 30.0)
FORMATS: tuple[str, ...] = ("tiff", "png", "npy")
FILLS: tuple[str, ...] = ("left", "right", "both", "none")

_REFLECTIVITY = np.array([0.03, 0.75, 0.45, 0.22, 0.50, 0.18, 0.80, 0.95, 0.50])  # per class, 0..1
_FLUID_REFLECTIVITY = 0.01
_THICKNESS = np.array([0.10, 0.22, 0.12, 0.08, 0.28, 0.07, 0.08])  # layers 1..7, fraction of retina
_FOVEAL_THINNING = np.array([0.95, 0.9, 0.85, 0.7, -0.3, 0.0, 0.0])  # relative loss at the fovea
_MIN_SIZE = 32  # smallest height / width the anatomy fits in


@dataclass(frozen=True)
class Phantom:
    """A phantom volume (Z, H, W) or B-scan (H, W); all arrays share that shape."""

    image: np.ndarray  # uint8 grey values; 255 = white fill, tissue <= 254
    layers: np.ndarray  # uint8 class map, 0..8, see LAYER_NAMES
    fluid: np.ndarray  # uint8 binary fluid mask, 1 = fluid
    fluid_instances: np.ndarray  # int32, 0 = background, 1..N = pockets, unique within a volume


def _smooth_curve(width: int, rng: np.random.Generator, correlation: float) -> np.ndarray:
    """Zero-mean, unit-std random curve (W,) smooth over ``correlation`` pixels."""
    curve = ndimage.gaussian_filter1d(rng.normal(size=width), max(correlation, 1.0), mode="reflect")
    std = curve.std()
    return (curve - curve.mean()) / (std if std > 0 else 1.0)


def _layer_boundaries(
    height: int, width: int, rng: np.random.Generator, fovea: float, fovea_x: float
) -> np.ndarray:
    """Rows (8, W) of the tops of layers 1..8; row 0 is the ILM, row 7 the RPE/choroid border."""
    x = np.arange(width, dtype=np.float64)
    u = 2 * x / max(width - 1, 1) - 1  # -1 .. 1 across the scan
    rpe = height * (0.70 - rng.uniform(0.02, 0.08) * u**2 + rng.uniform(-0.03, 0.03) * u)
    rpe += 1.5 * _smooth_curve(width, rng, width / 6)
    total = height * 0.33 * rng.uniform(0.9, 1.1)
    dip = fovea * np.exp(-0.5 * ((x - fovea_x * width) / (width * rng.uniform(0.07, 0.1))) ** 2)
    tops = [rpe]
    for k in range(len(_THICKNESS) - 1, -1, -1):  # stack layers 7..1 upwards from the RPE
        wobble = 1 + 0.08 * _smooth_curve(width, rng, width / 8)
        thickness = total * _THICKNESS[k] * (1 - _FOVEAL_THINNING[k] * dip) * wobble
        tops.append(tops[-1] - np.maximum(thickness, 0.0))
    return np.clip(np.stack(tops[::-1]), 2.0, height - 1.0)


def _layer_map(boundaries: np.ndarray, height: int) -> np.ndarray:
    """uint8 (H, W) class map: the number of layer tops at or above each pixel centre."""
    rows = np.arange(height, dtype=np.float64)[None, :, None] + 0.5
    return (rows >= boundaries[:, None, :]).sum(axis=0).astype(np.uint8)


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    """Boolean (H, W) mask of the ellipse with ``centre`` (y, x) and semi-axes ``axes`` (ay, ax)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) / axes[0]) ** 2 + ((xx - centre[1]) / axes[1]) ** 2 <= 1.0


def _random_pocket(
    boundaries: np.ndarray, shape: tuple[int, int], rng: np.random.Generator
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre (y, x) and semi-axes (ay, ax) of a pocket between the tops of GCL+IPL and EZ."""
    height, width = shape
    x = rng.uniform(0.08, 0.92) * width
    top, bottom = boundaries[1, int(x)], boundaries[5, int(x)]
    y = top + rng.uniform(0.35, 0.8) * (bottom - top)
    radius = rng.uniform(3.0, 8.0)  # pixels at the default 128 x 192
    ay, ax = radius * height / 128, radius * rng.uniform(0.8, 1.6) * width / 192
    return (y, x), (ay, ax)


def _fluid_instances(layers: np.ndarray, boundaries: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int32 (H, W) fluid pockets numbered 1..N; some pairs share a border (touching instances)."""
    shape = layers.shape
    allowed = np.isin(layers, FLUID_LAYERS)
    instances = np.zeros(shape, dtype=np.int32)

    def add(mask: np.ndarray) -> None:
        mask &= allowed & (instances == 0)  # a later pocket abuts, never overwrites, an earlier one
        instances[mask] = instances.max() + 1

    for _ in range(rng.integers(1, 4)):
        add(_ellipse(shape, *_random_pocket(boundaries, shape, rng)))
    if rng.random() < 0.6:  # a touching pair: the second ellipse overlaps the first, minus the first
        centre, axes = _random_pocket(boundaries, shape, rng)
        add(_ellipse(shape, centre, axes))
        axes_b = (axes[0] * rng.uniform(0.7, 1.1), axes[1] * rng.uniform(0.7, 1.1))
        shift = 0.8 * (axes[1] + axes_b[1]) * rng.choice([-1.0, 1.0])
        add(_ellipse(shape, (centre[0] + rng.uniform(-2, 2), centre[1] + shift), axes_b))
    sizes = np.bincount(instances.ravel())
    instances[sizes[instances] < 6] = 0  # drop slivers left by clipping
    _, relabelled = np.unique(instances, return_inverse=True)
    return relabelled.reshape(shape).astype(np.int32)


def _reflectivity(
    layers: np.ndarray, boundaries: np.ndarray, fluid: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """float64 (H, W) mean reflectivity in 0..1: per-class values, choroid texture, fluid."""
    height, width = layers.shape
    refl = _REFLECTIVITY[layers]
    rows = np.arange(height, dtype=np.float64)[:, None]
    depth = np.clip(rows - boundaries[7][None, :], 0.0, None)  # pixels below the RPE
    texture = ndimage.gaussian_filter(rng.random((height, width)), sigma=(1.5, 2.5), mode="reflect")
    texture = 0.5 + (texture - texture.min()) / max(np.ptp(texture), 1e-9)
    choroid = layers == len(LAYER_NAMES) - 1
    refl[choroid] *= (np.exp(-depth / (0.12 * height)) * texture)[choroid]
    refl[fluid] = _FLUID_REFLECTIVITY
    return refl


def _add_vessels(refl: np.ndarray, boundaries: np.ndarray, rng: np.random.Generator, fovea_x: float) -> None:
    """Bright vessels just below the ILM casting vertical shadows; none within the foveal zone."""
    height, width = refl.shape
    cols = np.arange(width, dtype=np.float64)
    rows = np.arange(height, dtype=np.float64)[:, None]
    for _ in range(rng.integers(2, 5)):
        x = rng.uniform(0.05, 0.95) * width
        if abs(x - fovea_x * width) < 0.12 * width:
            continue
        radius = rng.uniform(1.0, 2.0) * width / 192
        y = boundaries[0, int(x)] + radius + rng.uniform(0.5, 2.5)
        across = np.clip(1.5 - np.abs(cols - x) / radius, 0.0, 1.0)  # soft-edged stripe profile
        below = np.clip(rows - (y + radius), 0.0, 1.0)  # 0 above the vessel's bottom, 1 below
        refl *= 1 - 0.7 * below * across[None, :]
        refl[_ellipse(refl.shape, (y, x), (radius, radius))] = 0.9


def _speckle_to_uint8(refl: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W) image: gamma speckle (4 looks), slight blur, Rayleigh floor, capped at 254."""
    signal = refl * rng.gamma(shape=4.0, scale=0.25, size=refl.shape)
    signal = ndimage.gaussian_filter(signal, sigma=(0.6, 1.0), mode="reflect")
    signal += 0.02 * rng.rayleigh(size=refl.shape)
    return np.clip(np.rint(signal * 254), 0, 254).astype(np.uint8)


def _fill_mask(layers: np.ndarray, fill: str, fill_size: tuple[float, float]) -> np.ndarray:
    """Boolean (H, W) white-fill triangle(s) in the top corner(s), limited to the vitreous."""
    height, width = layers.shape
    legs_x, legs_y = max(fill_size[0] * width, 1.0), max(fill_size[1] * height, 1.0)
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    left = xx / legs_x + yy / legs_y < 1.0
    right = (width - 1 - xx) / legs_x + yy / legs_y < 1.0
    mask = {"left": left, "right": right, "both": left | right, "none": np.zeros_like(left)}[fill]
    return mask & (layers == 0)


def make_phantom_bscan(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    fovea: float = 1.0,
    fovea_x: float = 0.5,
    fluid: bool = True,
    fill: str = "left",
    fill_size: tuple[float, float] = (0.15, 0.15),
) -> Phantom:
    """One phantom B-scan; arrays (H, W).

    Args:
        height, width: size in pixels (each >= 32).
        rng: the generator all randomness comes from.
        fovea: depth of the foveal dip, 0 (none, B-scan far from the fovea) .. 1 (through the fovea).
        fovea_x: lateral position of the fovea as a fraction of the width.
        fluid: whether to add fluid pockets.
        fill: white-fill corner(s): "left", "right", "both" or "none".
        fill_size: the fill triangle's legs as fractions of (width, height).
    """
    _check_size(height, width)
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if not (0 <= fovea <= 1 and 0 <= fovea_x <= 1):
        raise ValueError(f"fovea and fovea_x must be in [0, 1], got fovea={fovea}, fovea_x={fovea_x}")
    boundaries = _layer_boundaries(height, width, rng, fovea, fovea_x)
    layers = _layer_map(boundaries, height)
    instances = _fluid_instances(layers, boundaries, rng) if fluid else np.zeros((height, width), np.int32)
    refl = _reflectivity(layers, boundaries, instances > 0, rng)
    _add_vessels(refl, boundaries, rng, fovea_x)
    image = _speckle_to_uint8(refl, rng)
    image[_fill_mask(layers, fill, fill_size)] = FILL_VALUE
    fluid_mask = (instances > 0).astype(np.uint8)
    return Phantom(image=image, layers=layers, fluid=fluid_mask, fluid_instances=instances)


def _check_size(height: int, width: int) -> None:
    """Raise ValueError unless height and width are ints >= the smallest size the anatomy fits in."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < _MIN_SIZE:
            raise ValueError(f"{name} must be an int >= {_MIN_SIZE} pixels, got {value!r}")


def make_phantom_volume(
    n_bscans: int = 8, height: int = 128, width: int = 192, seed: int = 0, fluid: bool = True
) -> Phantom:
    """A phantom volume of ``n_bscans`` B-scans; arrays (Z, H, W); the same seed gives the same volume.

    The B-scans are independent draws that share the fovea's lateral position and the fill corners;
    the foveal dip is deepest in the middle B-scan. With ``fluid`` about 80 % of the B-scans have
    fluid pockets; instance ids are unique within the volume.
    """
    if isinstance(n_bscans, bool) or not isinstance(n_bscans, (int, np.integer)) or n_bscans < 1:
        raise ValueError(f"n_bscans must be an int >= 1, got {n_bscans!r}")
    _check_size(height, width)
    rng = np.random.default_rng(seed)
    fill = str(rng.choice(FILLS[:3]))
    fill_size = (rng.uniform(0.1, 0.22), rng.uniform(0.1, 0.2))
    fovea_x = rng.uniform(0.4, 0.6)
    fovea_z = (n_bscans - 1) / 2 + rng.uniform(-0.5, 0.5)
    spread = max(1.0, n_bscans / 4)
    bscans: list[Phantom] = []
    n_instances = 0
    for z in range(n_bscans):
        fovea = float(np.exp(-0.5 * ((z - fovea_z) / spread) ** 2))
        has_fluid = fluid and rng.random() < 0.8
        b = make_phantom_bscan(
            height, width, rng, fovea=fovea, fovea_x=fovea_x, fluid=has_fluid, fill=fill, fill_size=fill_size
        )
        instances = np.where(b.fluid_instances > 0, b.fluid_instances + n_instances, 0).astype(np.int32)
        n_instances = max(n_instances, int(instances.max()))
        bscans.append(Phantom(b.image, b.layers, b.fluid, instances))
    return Phantom(*(np.stack([getattr(b, f.name) for b in bscans]) for f in fields(Phantom)))


def write_ome_tiff(path: str | Path, volume: np.ndarray, voxel_size_um: tuple[float, float, float] = VOXEL_SIZE_UM) -> Path:
    """Write a (Z, H, W) volume as an OME-TIFF stack whose PhysicalSize{Z,Y,X} give ``voxel_size_um``."""
    import tifffile

    z, y, x = voxel_size_um
    metadata = {"axes": "ZYX", "PhysicalSizeZ": z, "PhysicalSizeY": y, "PhysicalSizeX": x,
                "PhysicalSizeZUnit": "µm", "PhysicalSizeYUnit": "µm", "PhysicalSizeXUnit": "µm"}
    tifffile.imwrite(path, volume, photometric="minisblack", ome=True, metadata=metadata)
    return Path(path)


def _write_volume(
    image: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path, fmt: str
) -> None:
    """Write one (Z, H, W) uint8 volume and its label volume in ``fmt``."""
    if fmt == "tiff":
        write_ome_tiff(image_path, image)
        write_ome_tiff(label_path, labels)
    elif fmt == "npy":
        np.save(image_path, image)
        np.save(label_path, labels)
    else:
        from PIL import Image

        for folder, volume in ((image_path, image), (label_path, labels)):
            folder.mkdir(parents=True, exist_ok=True)
            for z, bscan in enumerate(volume):
                Image.fromarray(bscan).save(folder / f"bscan_{z:03d}.png")


def write_phantom_files(
    folder: str | Path,
    n_volumes: int = 3,
    fmt: str = "tiff",
    n_bscans: int = 8,
    height: int = 128,
    width: int = 192,
    seed: int = 0,
    fluid: bool = True,
) -> list[Path]:
    """Write ``n_volumes`` phantoms to ``folder`` and their fluid masks to ``folder/labels``.

    Volume i is ``make_phantom_volume(n_bscans, height, width, seed + i, fluid)``, written as

    - "tiff": ``phantom_000.tif``, a (Z, H, W) uint8 stack; mask 0/255;
    - "png": ``phantom_000/bscan_000.png`` ..., one 8-bit grey PNG per B-scan; mask 0/255;
    - "npy": ``phantom_000.npy``, a (Z, H, W) uint8 array; mask 0/1;

    with the mask under the same name in ``labels/``. Existing files are overwritten.

    Returns:
        One path per volume: the .tif / .npy file, or the folder of PNGs.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if isinstance(n_volumes, bool) or not isinstance(n_volumes, (int, np.integer)) or n_volumes < 0:
        raise ValueError(f"n_volumes must be an int >= 0, got {n_volumes!r}")
    folder = Path(folder)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    suffix = {"tiff": ".tif", "npy": ".npy", "png": ""}[fmt]
    paths = []
    for i in range(n_volumes):
        phantom = make_phantom_volume(n_bscans, height, width, seed + i, fluid)
        name = f"phantom_{i:03d}{suffix}"
        labels = phantom.fluid if fmt == "npy" else phantom.fluid * np.uint8(255)
        _write_volume(phantom.image, labels, folder / name, folder / "labels" / name, fmt)
        paths.append(folder / name)
    log.info("wrote %d phantom volumes (%s) to %s", n_volumes, fmt, folder)
    return paths
