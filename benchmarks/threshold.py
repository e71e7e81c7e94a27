"""Would a fluid-probability threshold beat arg-max, chosen out of fold? Measured on a finished cross-validation run.

Each fold model of a registered ensemble (``octseg train --config RECIPE``) predicts the fluid probability of
its own held-out subjects (with flips, as the ensemble predicts). For each fold a threshold is chosen on the
other folds' predictions (nested: the scored subjects choose nothing) and applied to the fold's subjects;
the pooled Dice of that is printed beside arg-max's (0.5) and beside the best single threshold over all
subjects (which a held-out subject could not have chosen). The same nested choice is then made for growing
the arg-max components into the pixels of fluid probability > t (hysteresis: no new components, only their
fuzzy edges; t from 0.30-0.45, or no growing). With ``--scales`` it also scores test-time augmentation over
input sizes: each fold model sees its subjects' B-scans resampled at its own ``scale_y``/``scale_x`` times each
factor (with flips; a size past 1 is clamped to 1 and each size scored once), alone and with the softmax averaged
over all sizes (fluid where its probability >= 0.5; a fixed set, no choice).

    .venv/bin/python benchmarks/threshold.py --tracking-uri sqlite:///mlflow.db --archive duke.zarr [--scales]
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
GROW = (0.3, 0.35, 0.4, 0.45, 0.5)  # 0.5: no growing (arg-max)
SCALES = ((1.0, 1.0), (0.85, 1.0), (1.15, 1.0), (1.0, 0.85), (1.0, 1.15), (0.9, 0.9), (1.1, 1.1))  # (y, x) factors


def main() -> None:
    import mlflow
    import torch
    from octseg.tasks.tracking.models import load_unet, resolve_model
    from octseg.tasks.training.dataset import load_volume_sets
    from octseg.unet.config import InferenceConfig
    from octseg.unet.crossval import oof_scores
    from octseg.unet.inference import predict_probabilities
    from skimage.filters import apply_hysteresis_threshold

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--model", default="models:/octseg-unet/1", help="a cross-validation ensemble (one model a fold)")
    ap.add_argument("--scales", action="store_true", help="also score test-time augmentation over input sizes")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ref = resolve_model(args.model, args.tracking_uri)
    ensemble = load_unet(ref, args.tracking_uri)
    folds = json.loads(mlflow.MlflowClient(tracking_uri=args.tracking_uri).get_run(ref.run_id).data.tags["octseg.folds"])
    if len(ensemble.members) != len(folds):
        raise SystemExit(f"{ref.uri}: {len(ensemble.members)} networks for {len(folds)} folds; one a fold expected")
    volumes = [v for fold in folds for v in fold]
    sets = load_volume_sets(args.archive, volumes)
    cfg = InferenceConfig(device="cpu", tta=True)

    def fluid_probabilities(fy: float = 1.0, fx: float = 1.0) -> dict[str, np.ndarray]:
        """Each fold model's fluid probabilities on its held-out subjects, B-scans seen at its scale x (fy, fx)."""
        out = {}
        for k, fold in enumerate(folds):
            net = ensemble.members[k]
            own = net.config
            net.config = dataclasses.replace(own, scale_y=min(1.0, own.scale_y * fy), scale_x=min(1.0, own.scale_x * fx))
            try:
                out.update({v: np.stack([predict_probabilities(net, b, cfg)[1] for b in sets[v].images]) for v in fold})
            finally:
                net.config = own
        return out

    probs = fluid_probabilities()
    truths = {v: sets[v].labels for v in volumes}

    def pooled(volumes_t: dict[str, float]):  # out-of-fold scores of the fluid labels p >= t, t per volume
        return oof_scores({v: probs[v] >= t for v, t in volumes_t.items()}, {v: truths[v] for v in volumes_t})

    def nested_choice(candidates, scores, prefer=lambda t: 0):
        """Each fold's t, the best pooled Dice of ``scores`` over the other folds' subjects (ties by ``prefer``):
        the t of each fold and the t of each volume."""
        chosen = [max(candidates, key=lambda t: (scores(dict.fromkeys([v for v in volumes if v not in fold], t)).pooled,
                                                 prefer(t))) for fold in folds]
        return chosen, {v: t for t, fold in zip(chosen, folds) for v in fold}

    chosen, nested = nested_choice(THRESHOLDS, pooled)
    everything = {t: round(float(pooled(dict.fromkeys(volumes, t)).pooled), 4) for t in THRESHOLDS}
    print(f"pooled Dice by threshold (all subjects; not out of fold): {everything}")
    print(f"nested thresholds {chosen}: {pooled(nested).line()}")
    print(f"arg-max: {pooled(dict.fromkeys(volumes, 0.5)).line()}")

    grown = {(v, t): np.stack([apply_hysteresis_threshold(p, t, 0.5) for p in probs[v]]) for v in volumes for t in GROW}

    def grown_scores(volumes_t: dict[str, float]):
        return oof_scores({v: grown[v, t] for v, t in volumes_t.items()}, {v: truths[v] for v in volumes_t})

    chosen, nested = nested_choice(GROW, grown_scores, prefer=lambda t: t)  # ties: no growing
    everything = {t: round(float(grown_scores(dict.fromkeys(volumes, t)).pooled), 4) for t in GROW}
    print(f"grown to p > t, pooled Dice by t (all subjects; not out of fold): {everything}")
    print(f"grown, nested t {chosen}: {grown_scores(nested).line()}")

    if args.scales:
        own = ensemble.members[0].config
        scaled = {}  # (scale_y, scale_x) the networks see -> probabilities; each size once
        for fy, fx in SCALES:
            size = (min(1.0, own.scale_y * fy), min(1.0, own.scale_x * fx))
            if size not in scaled:
                scaled[size] = probs if (fy, fx) == (1.0, 1.0) else fluid_probabilities(fy, fx)
                print(f"input size x ({fy}, {fx}) = scale ({size[0]:.4g}, {size[1]:.4g}): "
                      f"{oof_scores({v: scaled[size][v] >= 0.5 for v in volumes}, truths).line()}")
        mean = {v: np.mean([p[v] for p in scaled.values()], axis=0) for v in volumes}
        averaged = oof_scores({v: mean[v] >= 0.5 for v in volumes}, truths)
        print(f"softmax averaged over the {len(scaled)} sizes: {averaged.line()}")

if __name__ == "__main__":
    main()
