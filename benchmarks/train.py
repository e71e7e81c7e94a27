"""Benchmark P4: training-step throughput of ``octseg.unet.train.fit`` / a bare torch loop, same run.

The bare loop trains the same network with the same optimiser and loss on tensors already in memory
(random images, labels and weight maps of the tiles' shapes): the floor of what a step costs. ``fit``
adds what real training needs: drawing tiles from B-scans, the paper's elastic deformation and flips,
collation, the weight maps. Both run the same number of tiles; validation is off.

    .venv/bin/python benchmarks/train.py                      # depth 4, 16 channels, the paper's 572 tile
    .venv/bin/python benchmarks/train.py --tile 252 --batch 4 --workers 2
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.unet.bscans import BScanSet
from octseg.unet.config import TrainConfig, UNetConfig
from octseg.unet.inference import CHANNELS_LAST_DEVICES
from octseg.unet.model import UNet
from octseg.unet.normalize import normalize_volume
from octseg.unet.train import fit, make_optimizer, training_loss
from octseg.unet.weights import border_weight_map


def bare_loop(cfg: UNetConfig, train: TrainConfig, tile: int, steps: int) -> float:
    """Seconds for ``steps`` optimisation steps on in-memory tensors."""
    torch.manual_seed(0)
    model = UNet(cfg)
    out = model.output_size(tile)
    x = torch.randn(train.batch_size, 1, tile, tile)
    y = torch.randint(0, 2, (train.batch_size, out, out))
    w = torch.rand(train.batch_size, out, out) + 1
    if "cpu" in CHANNELS_LAST_DEVICES:  # the layout fit trains in
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, train)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = training_loss(model(x), y, w, train.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description="P4 = fit tiles/s ÷ bare torch loop tiles/s")
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved bare/fit measurements")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes in fit")
    args = parser.parse_args()
    cfg = UNetConfig(base_channels=args.base, depth=args.depth)
    ph = make_phantom_volume(n_bscans=4, height=496, width=768, seed=0)
    weights = np.stack([border_weight_map(f) for f in ph.fluid])
    data = BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64), weights)
    train = TrainConfig(epochs=1, batch_size=args.batch, tiles_per_epoch=args.steps * args.batch, tile_size=args.tile,
                        optimizer="sgd", device="cpu", num_workers=args.workers, restore_best=False)
    bare_loop(cfg, train, args.tile, 1)  # warm-up (allocator, oneDNN kernels)
    fit(UNet(cfg), data, None, replace(train, tiles_per_epoch=args.batch))  # warm-up too: first-call imports
    ratios, bare_rates, fit_rates = [], [], []
    tiles = args.steps * args.batch
    def timed_fit() -> float:
        t0 = time.perf_counter()
        fit(UNet(cfg), data, None, train)
        return time.perf_counter() - t0

    for r in range(args.rounds):  # interleaved, alternating which goes first (ABBA): no side gets the fresh CPU
        if r % 2 == 0:
            bare, real = bare_loop(cfg, train, args.tile, args.steps), timed_fit()
        else:
            real, bare = timed_fit(), bare_loop(cfg, train, args.tile, args.steps)
        ratios.append(bare / real)
        bare_rates.append(tiles / bare)
        fit_rates.append(tiles / real)
    print(f"network depth {args.depth}, {args.base} channels, tile {args.tile} -> {UNet(cfg).output_size(args.tile)}, "
          f"batch {args.batch}, {tiles} tiles per round, {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"{args.workers} loader workers")
    print(f"bare torch loop: {np.median(bare_rates):7.3f} tiles/s (median)")
    print(f"fit:             {np.median(fit_rates):7.3f} tiles/s (median)")
    print(f"P4 = {np.median(ratios):.2f}  (median of the rounds' ratios {', '.join(f'{r:.2f}' for r in ratios)}; "
          "goal >= 0.90)")


if __name__ == "__main__":
    main()
