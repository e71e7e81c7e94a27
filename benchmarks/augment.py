"""octseg's tile augmentation against batchgeneratorsv2 (nnU-Net's library) doing the same work, same run.

Both draw, per tile: a rotation, a zoom and an elastic deformation in one warp (image bicubic/bilinear,
labels nearest), Gaussian noise, Gaussian blur, brightness, contrast and gamma, and a left-right mirror.
octseg warps with torch's ``grid_sample`` and returns labels only for the window the loss sees; the
library warps the whole tile. Rounds alternate which side goes first; the ratio is the median of the rounds.

batchgeneratorsv2 is not a dependency of octseg; install it beside, without touching the environment::

    .venv/bin/pip install --target /tmp/bgsite --no-deps batchgeneratorsv2==0.3.6 batchgenerators==0.25.5
    PYTHONPATH=/tmp/bgsite .venv/bin/python benchmarks/augment.py --tile 572 --output 388
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from octseg.unet.augment import augment

KNOBS = dict(rotation=15.0, scaling=0.2, strength=0.3, noise=0.1, blur=1.0)


def ours(tiles: np.ndarray, labels: np.ndarray, out: int) -> float:
    halo = (tiles.shape[-1] - out) // 2
    window = np.s_[halo:halo + out, halo:halo + out]
    t = time.perf_counter()
    for i, (image, lab) in enumerate(zip(tiles, labels)):
        augment(image, lab, None, np.random.default_rng(i), window=window, **KNOBS)
    return len(tiles) / (time.perf_counter() - t)


def library(tiles: np.ndarray, labels: np.ndarray, out: int):
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    size = tiles.shape[-1]
    pipeline = ComposeTransforms([
        SpatialTransform((size, size), 0, random_crop=False, p_elastic_deform=1, p_rotation=1,
                         rotation=(-np.deg2rad(15), np.deg2rad(15)), p_scaling=1, scaling=(1 / 1.2, 1.2),
                         mode_seg="nearest", mode_image="bilinear"),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.01), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.15),  # octseg's probabilities (nnU-Net's: 0.1, 0.2)
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1), apply_probability=0.2),
        MultiplicativeBrightnessTransform(multiplier_range=(0.7, 1.3), synchronize_channels=False, p_per_channel=1),
        ContrastTransform(contrast_range=(0.7, 1.3), preserve_range=True, synchronize_channels=False,
                          p_per_channel=1),
        GammaTransform(gamma=(0.7, 1.3), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
                       p_retain_stats=1),
        MirrorTransform(allowed_axes=(1,)),
    ])

    def run() -> float:
        t = time.perf_counter()
        for image, lab in zip(tiles, labels):
            pipeline(image=torch.from_numpy(image)[None], segmentation=torch.from_numpy(lab)[None])
        return len(tiles) / (time.perf_counter() - t)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--output", type=int, default=388, help="the window the loss sees (valid padding)")
    parser.add_argument("--tiles", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((args.tiles, args.tile, args.tile)).astype(np.float32)
    labels = (rng.random((args.tiles, args.tile, args.tile)) > 0.9).astype(np.uint8)
    try:
        theirs = library(tiles, labels, args.output)
    except ImportError:
        raise SystemExit("batchgeneratorsv2 is not importable: see this script's docstring") from None
    ratios = []
    for r in range(args.rounds):
        a, b = (ours(tiles, labels, args.output), theirs()) if r % 2 == 0 else (None, theirs())
        if a is None:
            a = ours(tiles, labels, args.output)
        ratios.append(a / b)
        print(f"round {r}: octseg {a:.1f} tiles/s, batchgeneratorsv2 {b:.1f} tiles/s, ratio {a / b:.2f}", flush=True)
    print(f"tile {args.tile} (loss window {args.output}): octseg / batchgeneratorsv2 = {statistics.median(ratios):.2f} "
          f"(median of {args.rounds} rounds; > 1: octseg faster)")


if __name__ == "__main__":
    main()
