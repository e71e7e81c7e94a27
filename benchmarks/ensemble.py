"""Time and memory per B-scan of a fold ensemble (with and without test-time flips) beside one model's.

Each variant runs ``octseg.unet.inference.segment_volume`` over the same B-scans (Duke Subject_01 when
../shared/data is there, else phantoms) in a fresh process, so its peak resident memory is its own;
variants alternate over ``--rounds`` and the medians are printed with their ratio to the single model.

    .venv/bin/python benchmarks/ensemble.py                      # the recipes' network, 3 folds
    .venv/bin/python benchmarks/ensemble.py --recipe flows/recipes/duke-dme-fluid-accurate.yaml --bscans 8
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"single": (1, False), "single+flips": (1, True), "ensemble": (None, False), "ensemble+flips": (None, True)}


def _child(recipe: Path, members: int, tta: bool, bscans: int) -> dict:
    import numpy as np
    import torch
    import yaml

    from benchmarks.segment import load_volume
    from octseg.unet.config import InferenceConfig, UNetConfig
    from octseg.unet.ensemble import UNetEnsemble
    from octseg.unet.inference import segment_volume
    from octseg.unet.model import UNet
    from octseg.unet.normalize import normalize_volume

    spec = yaml.safe_load(recipe.read_text())
    config = UNetConfig(**spec.get("unet", {}))
    torch.manual_seed(0)
    nets = [UNet(config).eval() for _ in range(members)]
    model = nets[0] if members == 1 else UNetEnsemble(nets).eval()
    volume = normalize_volume(load_volume(bscans)[0])
    cfg = InferenceConfig(device="cpu", tta=tta)
    segment_volume(model, volume[:1], cfg)  # warm-up
    t = time.perf_counter()
    segment_volume(model, volume, cfg)
    seconds = (time.perf_counter() - t) / len(volume)
    return {"seconds_per_bscan": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": sum(p.numel() for p in model.parameters()), "shape": list(np.shape(volume))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("flows/recipes/duke-dme-fluid-fast.yaml"))
    parser.add_argument("--members", type=int, default=None, help="ensemble size (default: the recipe's folds)")
    parser.add_argument("--bscans", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("MEMBERS", "TTA", "BSCANS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.recipe, int(args.child[0]), args.child[1] == "1", int(args.child[2]))))
        return
    import yaml

    members = args.members or yaml.safe_load(args.recipe.read_text()).get("folds") or 3
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        names = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in names:
            m, tta = VARIANTS[name]
            out = subprocess.run([sys.executable, __file__, "--recipe", str(args.recipe), "--child", str(m or members),
                                  str(int(tta)), str(args.bscans)], capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parents[1])
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(x["seconds_per_bscan"] for x in runs["single"])
    print(f"{args.recipe.name}: {members} members, {args.bscans} B-scans of {runs['single'][0]['shape'][1:]}, "
          f"medians of {args.rounds} rounds (CPU)")
    for name, rows in runs.items():
        s = statistics.median(x["seconds_per_bscan"] for x in rows)
        peak = statistics.median(x["peak_mib"] for x in rows)
        print(f"  {name:15s} {s:6.3f} s/B-scan ({s / base:4.2f}x)  peak {peak:6.0f} MiB  "
              f"{rows[0]['params']:,} parameters")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
