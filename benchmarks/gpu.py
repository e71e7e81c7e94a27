"""The GPU path, measured: inference B-scans/s, training steps/s with and without AMP, the gain of
``torch.compile``, and the time of a recipe's training, each against a baseline measured in the same run.

Runs on the device machine through ``benchmarks/gpu.sh`` (which sets up the imports and the data), or
anywhere with CUDA:

    python benchmarks/gpu.py --recipe flows/recipes/duke-dme-fluid-accurate.yaml --duke DUKE_FOLDER

Prints one line per figure and a JSON summary (``--json FILE``). Inference: the paper's 64-channel
network on whole 496 x 768 B-scans (mirror-padded to 684 x 956, batch 8), fp32 vs bf16 autocast with
channels_last, eager vs compiled. Training: 572 -> 388 tiles, batch 4, fp32 vs bf16.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from octseg.unet.config import UNetConfig
from octseg.unet.inference import covering_input
from octseg.unet.model import UNet


def _timed(fn, warmup: int, reps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls, CUDA synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def inference(base: int, batch: int, amp: bool, compiled: bool, reps: int) -> float:
    """B-scans/s of the network on whole 496 x 768 B-scans."""
    cfg = UNetConfig(base_channels=base)
    model = UNet(cfg).cuda().eval().to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    shape = (batch, 1, covering_input(496, cfg.depth, cfg.padding), covering_input(768, cfg.depth, cfg.padding))
    x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            net(x).argmax(1)

    return batch / _timed(step, warmup=3 if compiled else 2, reps=reps)


def training(base: int, batch: int, amp: bool, reps: int) -> float:
    """Optimisation steps/s on 572 -> 388 tiles."""
    model = UNet(base_channels=base).cuda().train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)
    x = torch.randn(batch, 1, 572, 572, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, 388, 388), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return 1.0 / _timed(step, warmup=3, reps=reps)


def recipe_time(recipe: Path, duke: Path) -> dict:
    """Seconds to train the recipe (all its folds) on the Duke B-scans in ``duke`` (images/, masks/,
    index.csv), with octseg.unet's own fit; the command adds Prefect and MLflow around the same calls."""
    import csv

    import yaml
    from PIL import Image

    from octseg.unet.bscans import BScanSet
    from octseg.unet.config import TrainConfig
    from octseg.unet.crossval import subject_folds
    from octseg.unet.normalize import normalize_bscan
    from octseg.unet.train import fit
    from octseg.unet.weights import border_weight_map

    spec = yaml.safe_load(recipe.read_text())
    unet = UNetConfig(**spec.get("unet", {}))
    train = TrainConfig(**{**spec.get("train", {}), "device": "cuda"})
    subjects: dict[str, list] = {}
    for row in csv.DictReader(open(duke / "index.csv")):
        image = normalize_bscan(np.asarray(Image.open(duke / "images" / f"{row['file_stem']}.png"))[..., 0])
        mask = (np.asarray(Image.open(duke / "masks" / f"{row['file_stem']}.png")).max(-1) > 0).astype(np.int64)
        subjects.setdefault(row["subject"], []).append((image, mask, border_weight_map(mask)))
    folds = subject_folds(list(subjects), spec["folds"]) if spec.get("folds") else [[]]
    t = time.perf_counter()
    for held_out in folds:
        rows = [r for s, v in subjects.items() if s not in held_out for r in v]
        data = BScanSet(*(np.stack([r[i] for r in rows]) for i in range(3)))
        torch.manual_seed(train.seed)
        fit(UNet(unet), data, None, train)
    return {"recipe": recipe.name, "folds": len(folds), "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, default=64, help="channels of the first level (the paper: 64)")
    parser.add_argument("--batch", type=int, default=8, help="B-scans per inference pass")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--recipe", type=Path, help="a recipe YAML to time (needs --duke)")
    parser.add_argument("--duke", type=Path, help="Duke DME folder: images/, masks/, index.csv")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to measure")
    torch.backends.cudnn.benchmark = True
    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(f"GPU: {out['gpu']}, torch {out['torch']}", flush=True)
    fp32 = inference(args.base, args.batch, amp=False, compiled=False, reps=args.reps)
    bf16 = inference(args.base, args.batch, amp=True, compiled=False, reps=args.reps)
    compiled = inference(args.base, args.batch, amp=True, compiled=True, reps=args.reps)
    out["inference_bscans_per_s"] = {"fp32": round(fp32, 1), "bf16_channels_last": round(bf16, 1),
                                     "bf16_compiled": round(compiled, 1)}
    print(f"inference, {args.base} channels, 496x768 B-scans, batch {args.batch}: fp32 {fp32:.0f}/s, "
          f"bf16+channels_last {bf16:.0f}/s ({bf16 / fp32:.2f}x), compiled {compiled:.0f}/s "
          f"({compiled / bf16:.2f}x of eager bf16)", flush=True)
    t32 = training(args.base, 4, amp=False, reps=args.reps)
    t16 = training(args.base, 4, amp=True, reps=args.reps)
    out["train_steps_per_s"] = {"fp32": round(t32, 2), "bf16_amp": round(t16, 2)}
    print(f"training, 572 tiles, batch 4: fp32 {t32:.2f} steps/s, AMP {t16:.2f} steps/s ({t16 / t32:.2f}x)", flush=True)
    if args.recipe is not None and args.duke is not None:
        out["recipe"] = recipe_time(args.recipe, args.duke)
        print(f"recipe {out['recipe']['recipe']}: {out['recipe']['folds']} fold(s) in {out['recipe']['seconds']} s",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
