"""Does the channels_last (NHWC) memory layout speed up the U-Net on this machine's CPU? Same run, interleaved.

octseg trains and infers in channels_last on CUDA and on the CPU (``octseg.unet.inference.CHANNELS_LAST_DEVICES``).
This script times, in one process, each case with the layout on and off (ABBA order over the rounds, so neither
side always gets the fresh CPU) and prints the ratio channels_last time / contiguous time (< 1: faster):

- a training step (``octseg.unet.train.fit``: tiles drawn, augmented, forward, loss, backward, Adam) and
  ``predict_probabilities`` on a whole 496 x 768 B-scan, with the Duke recipes' network
  (16 channels, depth 4, zero padding, batch norm, B-scans at 0.375 x 0.25);
- the same two with the paper's network (64 channels, valid convolutions, 572 tiles; a bare step, batch 1).

    .venv/bin/python benchmarks/layout.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

import octseg.unet.inference as inference
import octseg.unet.train as training
from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.unet.bscans import BScanSet
from octseg.unet.config import InferenceConfig, TrainConfig, UNetConfig
from octseg.unet.model import UNet
from octseg.unet.normalize import normalize_volume
from octseg.unet.weights import border_weight_map

RECIPE = Path(__file__).resolve().parents[1] / "flows" / "recipes" / "duke-dme-fluid-fast.yaml"


def layout(on: bool) -> None:
    """channels_last on the CPU (as octseg ships) or not (contiguous NCHW, torch's default)."""
    devices = ("cuda", "cpu") if on else ("cuda",)
    inference.CHANNELS_LAST_DEVICES = training.CHANNELS_LAST_DEVICES = devices


def timed(fn: Callable[[], None], repeat: int) -> float:
    fn()  # warm-up: oneDNN primitives for this layout and shape
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(RECIPE.read_text())
    net_cfg = UNetConfig(**recipe["unet"])
    train_cfg = TrainConfig(**{**recipe["train"], "epochs": 1, "tiles_per_epoch": 8 * recipe["train"]["batch_size"]},
                            device="cpu", restore_best=False)
    ph = make_phantom_volume(n_bscans=4, height=496, width=768, seed=0)
    data = BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64),
                    np.stack([border_weight_map(f) for f in ph.fluid]))
    bscan = data.images[0]
    paper = UNetConfig()

    def recipe_train() -> None:
        torch.manual_seed(0)
        training.fit(UNet(net_cfg), data, None, train_cfg)

    def recipe_infer() -> None:
        inference.predict_probabilities(model_r, bscan, InferenceConfig(device="cpu"))

    def paper_step() -> None:
        model_p.train()
        loss = training.training_loss(model_p(x_p), y_p, w_p, 0.0)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    def paper_infer() -> None:
        model_p.eval()
        with torch.inference_mode():
            model_p(x_p)

    cases = {"recipe network, fit (8 steps of 4 tiles)": (recipe_train, 1),
             "recipe network, one 496 x 768 B-scan": (recipe_infer, 5),
             "paper network, training step (572 tile)": (paper_step, 2),
             "paper network, forward (572 tile)": (paper_infer, 2)}
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, (fn, repeat) in cases.items():
            t = {}
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                layout(on)
                torch.manual_seed(0)
                model_r = UNet(net_cfg).eval()
                model_p = UNet(paper)
                x_p = torch.randn(1, 1, 572, 572)
                out = model_p.output_size(572)
                y_p, w_p = torch.randint(0, 2, (1, out, out)), torch.ones(1, out, out)
                if on:
                    model_p = model_p.to(memory_format=torch.channels_last)
                    x_p = x_p.contiguous(memory_format=torch.channels_last)
                opt_p = training.make_optimizer(model_p, replace(train_cfg, optimizer="sgd"))
                t[on] = timed(fn, repeat)
            ratios[name].append(t[True] / t[False])
            seconds[name].append(t[False])
    print(f"{args.threads} threads, {args.rounds} rounds (ABBA); ratio = channels_last time / contiguous time")
    for name in cases:
        print(f"{name:45s} contiguous {np.median(seconds[name]):7.3f} s   ratio {np.median(ratios[name]):.2f} "
              f"(rounds: {', '.join(f'{v:.2f}' for v in ratios[name])})")


if __name__ == "__main__":
    main()
