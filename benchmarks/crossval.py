"""Out-of-fold fluid Dice of a training variant on the Duke subjects, for ablations (no Prefect, no MLflow).

The same subject folds as ``octseg train --folds K`` (:func:`octseg.unet.crossval.subject_folds`), the same
``fit``, and each fold's model scoring its held-out subjects as the registered ensemble would (whole
B-scans, test-time flips); post-processing is chosen for each fold on the other folds' predictions.
A variant is a recipe plus overrides:

    .venv/bin/python benchmarks/crossval.py --recipe flows/recipes/duke-dme-fluid-fast.yaml --set train.epochs=60
    .venv/bin/python benchmarks/crossval.py --recipe flows/recipes/duke-dme-fluid-fast.yaml --set train.augment=false
    .venv/bin/python benchmarks/crossval.py --recipe ... --set unet.instance_norm=true --set unet.batch_norm=false

Prints the pooled and per-subject out-of-fold Dice (raw and post-processed), the bootstrap interval over
subjects, the false alarms in fluid-free B-scans and the training seconds of each fold; with ``--fit`` also
each fold model's Dice on the subjects it trained on (a model that fits them little more than it scores out
of fold is under-fitted; much more, over-fitted).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from octseg.unet.bscans import BScanSet
from octseg.unet.config import InferenceConfig, TrainConfig, UNetConfig
from octseg.unet.crossval import oof_scores, subject_folds
from octseg.unet.inference import segment_volume
from octseg.unet.model import UNet
from octseg.unet.normalize import normalize_bscan
from octseg.unet.postprocess import choose_postprocess, postprocess
from octseg.unet.train import fit
from octseg.unet.weights import border_weight_map

DUKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "duke_dme_fluid"


def load_subjects(folder: Path, columns: tuple[int, int] | None = None) -> dict[str, BScanSet]:
    """The annotated Duke B-scans, one set per subject, normalised, with the paper's weight maps."""
    rows: dict[str, list] = {}
    for row in csv.DictReader(open(folder / "index.csv")):
        image = normalize_bscan(np.asarray(Image.open(folder / "images" / f"{row['file_stem']}.png"))[..., 0])
        mask = (np.asarray(Image.open(folder / "masks" / f"{row['file_stem']}.png")).max(-1) > 0).astype(np.int64)
        if columns is not None:  # only these columns were annotated: the rest is ignored by the losses
            mask[:, : columns[0]] = -100
            mask[:, columns[1]:] = -100
        rows.setdefault(row["subject"], []).append((int(row["bscan_index_0based"]), image, mask))
    sets = {}
    for subject, items in rows.items():
        items.sort(key=lambda t: t[0])
        labels = np.stack([t[2] for t in items])
        sets[subject] = BScanSet(np.stack([t[1] for t in items]), labels,
                                 np.stack([border_weight_map(np.maximum(m, 0)) for m in labels]))
    return sets


def _override(spec: dict, assignment: str) -> None:
    key, value = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("flows/recipes/duke-dme-fluid-fast.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.epochs=60")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--duke", type=Path, default=DUKE)
    parser.add_argument("--columns", type=int, nargs=2, metavar=("FIRST", "END"),
                        help="train on these columns' labels only (the annotated ones); scores stay on whole B-scans")
    parser.add_argument("--fit", action="store_true",
                        help="also score each fold's model on its own training subjects (under- or over-fitting?)")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = parser.parse_args()
    spec = yaml.safe_load(args.recipe.read_text())
    for assignment in args.set:
        _override(spec, assignment)
    unet, train = UNetConfig(**spec.get("unet", {})), TrainConfig(**{"device": "cpu", **spec.get("train", {})})
    sets = load_subjects(args.duke, tuple(args.columns) if args.columns else None)
    folds = subject_folds(list(sets), args.folds)
    oof, seconds, fitted = {}, [], {}
    for k, held_out in enumerate(folds):
        rest = [s for s in sorted(sets) if s not in held_out]
        data = BScanSet(*(np.concatenate([getattr(sets[s], f) for s in rest]) for f in ("images", "labels", "weights")))
        torch.manual_seed(train.seed + k)
        model = UNet(unet)
        t = time.perf_counter()
        fit(model, data, None, train)
        seconds.append(round(time.perf_counter() - t))
        oof.update({s: segment_volume(model, sets[s].images, InferenceConfig(device="cpu", tta=True)) for s in held_out})
        print(f"fold {k} {held_out}: {seconds[-1]} s", flush=True)
        if args.fit:  # the same model on the subjects it trained on
            seen = {s: segment_volume(model, sets[s].images, InferenceConfig(device="cpu", tta=True)) for s in rest}
            on_seen = oof_scores(seen, {s: np.maximum(sets[s].labels, 0) for s in rest})
            fitted[k] = on_seen.to_dict()
            print(f"  on its training subjects: {on_seen.line()}", flush=True)
    truths = {s: np.maximum(sets[s].labels, 0) for s in oof}
    raw = oof_scores(oof, truths)
    processed = {}
    for held_out in folds:
        choice, _ = choose_postprocess({s: oof[s] for s in oof if s not in held_out},
                                       {s: truths[s] for s in oof if s not in held_out})
        processed.update({s: postprocess(oof[s], choice) for s in held_out})
    scores = oof_scores(processed, truths)
    print(f"raw: {raw.line()}\npost-processed: {scores.line()}\ntraining s a fold: {seconds}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"recipe": str(args.recipe), "set": args.set, "raw": raw.to_dict(),
                                "postprocessed": scores.to_dict(), "seconds": seconds,
                                **({"fit": fitted} if args.fit else {})}) + "\n")


if __name__ == "__main__":
    main()
