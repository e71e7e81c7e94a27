"""Cross-validation by subject in ONE MLflow run: K U-Nets, each with whole volumes held out, registered as ONE
model version (their ensemble) together with its out-of-fold scores and the post-processing chosen on them.

Volumes are subjects (:func:`octseg.unet.crossval.subject_folds`). Fold k trains on the other folds'
volumes with a fixed schedule (no validation inside a fold: nothing chooses an epoch), then predicts its
held-out volumes with the same inference as ``octseg segment`` (with test-time flips, as the registered
ensemble predicts: nnU-Net's mirroring). Every choice made from data uses only
data that the scored predictions did not see:

* the reported out-of-fold Dice applies to fold k's predictions the post-processing chosen on the *other*
  folds' predictions (nested); the raw figure without post-processing is logged beside it;
* the model's own post-processing is chosen on all out-of-fold predictions (nnU-Net's rule: kept only if
  it raises the pooled Dice) and applies to new subjects only.

After each fold the run's checkpoint holds the finished folds (weights and out-of-fold labels), so a
killed run continues from the next fold. Each fold's loss curve is a nested MLflow run ``fold-k``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from octseg.tasks.archive.classes import DEFAULT_CLASS_NAMES, class_names_of
from octseg.tasks.segmentation.qc import side_by_side
from octseg.tasks.tracking.champion import FOREGROUND, REGISTERED, promote_if_better
from octseg.tasks.tracking.models import log_unet
from octseg.tasks.runtime.progress import progress_bar
from octseg.tasks.tracking.uri import ensure_experiment, using_tracking_uri
from octseg.tasks.training.resume import save_checkpoint, unfinished_run
from octseg.tasks.training.train import (
    TrainResult,
    check_classes,
    check_volume_classes,
    epoch_logger,
    find_previous_training,
    progress_logger,
    run_params,
    run_context_tags,
    training_fingerprint,
)
from octseg.unet.config import InferenceConfig, TrainConfig, UNetConfig

if TYPE_CHECKING:
    from octseg.unet.bscans import BScanSet
    from octseg.unet.train import EpochStats

__all__ = ["OUT_OF_FOLD", "crossval_and_register", "crossval_fingerprint", "crossval_from_archive_task", "merged"]

log = logging.getLogger(__name__)

OUT_OF_FOLD = "out-of-fold"  # the score_source tag of a cross-validation run


def merged(sets: Mapping[str, BScanSet], volumes: list[str]) -> BScanSet:
    """The B-scans of ``volumes`` as one set (weights only when every volume has them)."""
    from octseg.unet.bscans import BScanSet

    parts = [sets[v] for v in volumes]
    weights = np.concatenate([p.weights for p in parts]) if all(p.weights is not None for p in parts) else None
    return BScanSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), weights)


def crossval_fingerprint(sets: Mapping[str, BScanSet], folds: list[list[str]], unet_config: UNetConfig,
                         train_config: TrainConfig, model_name: str, fold_models: int = 1) -> str:
    """The training fingerprint of all the data, plus which volume sits in which fold (and the models a fold)."""
    base = training_fingerprint(merged(sets, sorted(sets)), None, unet_config, train_config, model_name)
    return hashlib.sha256(json.dumps([base, folds] + ([fold_models] if fold_models > 1 else [])).encode()).hexdigest()


def _oof_metrics(scores, prefix: str, name: str) -> dict[str, float]:
    out = {f"{prefix}_dice_{name}": scores.pooled, f"{prefix}_dice_{name}_ci_low": scores.interval[0],
           f"{prefix}_dice_{name}_ci_high": scores.interval[1], f"{prefix}_false_alarm_bscans": scores.false_alarms,
           f"{prefix}_empty_bscans": scores.empty_bscans}
    out.update({f"{prefix}_dice_{name}.{volume}": d for volume, d in scores.per_subject.items()})
    return {k: float(v) for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def _train_fold(k: int, held_out: list[str], sets: Mapping[str, BScanSet], unet_config: UNetConfig,
                train_config: TrainConfig, names: Mapping[int, str],
                progress: Callable[[EpochStats], None] | None,
                fold_models: int = 1) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Fold k in a nested MLflow run: (the weights of its ``fold_models`` models on the CPU, out-of-fold labels of
    the held-out volumes from their averaged softmax)."""
    import mlflow
    import torch

    from octseg.unet.ensemble import UNetEnsemble
    from octseg.unet.inference import segment_volume
    from octseg.unet.model import UNet
    from octseg.unet.train import fit

    train = merged(sets, [v for v in sorted(sets) if v not in held_out])
    experiment_id = mlflow.active_run().info.experiment_id  # else a nested run goes to the default experiment
    states = []
    with mlflow.start_run(run_name=f"fold-{k}", nested=True, experiment_id=experiment_id,
                          tags={"octseg.fold": str(k)}):
        mlflow.log_params({"held_out": ",".join(held_out), "n_train": len(train), "fold_models": fold_models})
        for m in range(fold_models):  # model 0 as a fold of one model; the others each their own seed
            config = train_config if m == 0 else dataclasses.replace(train_config, seed=train_config.seed + 1000 * m)
            torch.manual_seed(config.seed + k)  # each fold (and model) its own initial weights, reproducibly
            model = UNet.from_config(unet_config)
            fit(model, train, None, config, epoch_logger(names, progress))
            states.append({key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()})
        inference = InferenceConfig(device=train_config.device, tta=True)  # as the ensemble will predict
        predictor = model if fold_models == 1 else UNetEnsemble.from_state_dicts(unet_config, states).to(
            next(model.parameters()).device)
        oof = {v: segment_volume(predictor, sets[v].images, inference) for v in held_out}
    return states, oof


def silent_folds(split: list[list[str]], oof: Mapping[str, np.ndarray], truths: Mapping[str, np.ndarray],
                 foreground: str) -> list[str]:
    """A warning for each fold whose model predicts no foreground at all on held-out volumes that have some:
    a model that learnt nothing of the class (its score of 0 is not bad luck)."""
    return [f"fold-{k} (its MLflow run): its model predicts no {foreground} anywhere in {held_out}, which hold "
            f"{sum(int((truths[v] == FOREGROUND).sum()) for v in held_out)} {foreground} pixels: it learnt nothing "
            f"of the class (too few steps, or a learning rate that diverged?)"
            for k, held_out in enumerate(split)
            if any((truths[v] == FOREGROUND).any() for v in held_out) and not any((oof[v] == FOREGROUND).any()
                                                                                 for v in held_out)]


def _nested_postprocess(oof: dict[str, np.ndarray], truths: dict[str, np.ndarray],
                        folds: list[list[str]]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Each fold's labels after the post-processing chosen on the other folds' labels, and the choices."""
    from octseg.unet.postprocess import choose_postprocess, postprocess

    out, chosen = {}, []
    for held_out in folds:
        others = [v for v in oof if v not in held_out]
        choice, _ = choose_postprocess({v: oof[v] for v in others}, {v: truths[v] for v in others})
        chosen.append(choice.min_size)
        out.update({v: postprocess(oof[v], choice) for v in held_out})
    return out, chosen


def _report(scores, raw, nested_choice: list[int], final, table: dict[int, float], folds: list[list[str]]) -> str:
    rows = "\n".join(f"| {v} | {raw.per_subject[v]:.3f} | {d:.3f} |" for v, d in scores.per_subject.items())
    return (f"# Out-of-fold scores ({len(folds)} folds: {folds})\n\n"
            f"Post-processed (each fold with the choice made on the other folds, min sizes {nested_choice}): "
            f"{scores.line()}\n\nRaw: {raw.line()}\n\n| volume | raw Dice | post-processed Dice |\n|---|---|---|\n"
            f"{rows}\n\nThe registered ensemble removes components under {final.min_size} pixels "
            f"(0: none), chosen on all out-of-fold labels; pooled Dice per candidate: "
            f"{json.dumps({k: round(v, 4) for k, v in table.items()})}\n")


def crossval_and_register(
    sets: Mapping[str, BScanSet],
    unet_config: UNetConfig,
    train_config: TrainConfig,
    folds: int,
    *,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    class_names: Mapping[int, str] = DEFAULT_CLASS_NAMES,
    tags: Mapping[str, str] | None = None,
    progress: Callable[[EpochStats], None] | None = None,
    force: bool = False,
    promote: bool = True,
    fold_models: int = 1,
    trained_on: Mapping[str, str | None] | None = None,
) -> TrainResult:
    """K-fold cross-validation over the annotated volumes ``sets`` (volume id -> B-scans), ``fold_models`` models
    a fold, registered as one ensemble; its score is the pooled out-of-fold Dice of class 1 (nested post-processing), which
    promotion compares with the champion's ``registered_oof_dice_<class 1>``. ``trained_on``: as
    :func:`~octseg.tasks.training.train.train_and_register`'s (the ensemble saw every volume)."""
    import mlflow
    import torch

    from octseg.unet.crossval import oof_scores, subject_folds
    from octseg.unet.ensemble import UNetEnsemble
    from octseg.unet.postprocess import choose_postprocess

    split = subject_folds(list(sets), folds)
    everything = merged(sets, sorted(sets))
    check_classes(everything, None, unet_config)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    names = class_names_of(unet_config.out_channels, class_names)
    fingerprint = crossval_fingerprint(sets, split, unet_config, train_config, model_name, fold_models)
    if not force and (done := find_previous_training(fingerprint, tracking_uri, experiment_id, model_name, names)):
        log.info("identical cross-validation already registered as %s v%s", model_name, done.model_version)
        return done
    run_id, state = unfinished_run(tracking_uri, experiment_id, fingerprint)
    finished: dict[int, dict[str, Any]] = dict(state["folds"]) if state else {}
    run_tags = {**run_context_tags(), "octseg.score_source": OUT_OF_FOLD, "octseg.fingerprint": fingerprint,
                "octseg.folds": json.dumps(split), **(tags or {})}
    start = {"run_id": run_id} if run_id else {"experiment_id": experiment_id}
    foreground = names[FOREGROUND]
    with using_tracking_uri(tracking_uri), mlflow.start_run(**start, tags=run_tags) as run:
        if not finished:
            mlflow.log_params({**run_params(unet_config, train_config, everything, None, names), "folds": folds,
                               "fold_models": fold_models})
        for k, held_out in enumerate(split):
            if k in finished:
                log.info("fold %d of %d: finished in this run before, kept", k + 1, folds)
                continue
            members, labels = _train_fold(k, held_out, sets, unet_config, train_config, names, progress, fold_models)
            finished[k] = {"members": members, "oof": {v: torch.from_numpy(lab) for v, lab in labels.items()}}
            save_checkpoint({"folds": finished})  # a killed run continues from the next fold (tensors only)
        oof = {v: lab.numpy() for f in finished.values() for v, lab in f["oof"].items()}
        truths = {v: sets[v].labels for v in oof}
        for line in silent_folds(split, oof, truths, foreground):
            log.warning(line)
        raw = oof_scores(oof, truths)
        processed, nested_choice = _nested_postprocess(oof, truths, split)
        scores = oof_scores(processed, truths)
        final, table = choose_postprocess(oof, truths)
        mlflow.log_metrics({**_oof_metrics(raw, "oof_raw", foreground), **_oof_metrics(scores, "oof", foreground),
                            f"{REGISTERED}oof_dice_{foreground}": scores.pooled, "postprocess_min_size": final.min_size})
        mlflow.log_dict({"folds": split, "raw": raw.to_dict(), "postprocessed": scores.to_dict(),
                         "nested_min_sizes": nested_choice, "min_size": final.min_size,
                         "candidates": table}, "crossval/oof.json")
        mlflow.log_text(_report(scores, raw, nested_choice, final, table, split), "crossval/report.md")
        worst = max(oof, key=lambda v: int((truths[v] == FOREGROUND).sum()))
        z = int(np.argmax((truths[worst] == FOREGROUND).sum(axis=(1, 2))))
        mlflow.log_image(side_by_side(sets[worst].images[z], truths[worst][z], processed[worst][z]),
                         artifact_file=f"qc/oof_{worst}_bscan{z:03d}.png")
        ensemble = UNetEnsemble.from_state_dicts(unet_config, [member for k in range(folds) for member in (
            finished[k]["members"] if "members" in finished[k] else [finished[k]["weights"]])])  # or an older run's
        ensemble.postprocess, ensemble.tta = final, True  # softmax averaged over folds and flips
        ensemble.trained_on = dict(trained_on) if trained_on is not None else None
        version = log_unet(ensemble, model_name, metadata={"class_names": {str(k): v for k, v in names.items()},
                                                           "folds": split})
        qc_image = f"{run.info.artifact_uri}/qc/oof_{worst}_bscan{z:03d}.png"
    log.info("out-of-fold: %s", scores.line())
    promoted = promote and promote_if_better(model_name, version, scores.pooled, tracking_uri,
                                             metric=f"{REGISTERED}oof_dice_{foreground}")
    return TrainResult(run.info.run_id, model_name, version, {FOREGROUND: scores.pooled}, scores.pooled, promoted,
                       qc_image, n_train=len(everything), n_val=0, folds=folds, oof=scores.to_dict())


@task(name="crossval-unet-from-archive", cache_policy=NO_CACHE)
def crossval_from_archive_task(archive_path: str, volumes: list[str], unet_config: UNetConfig,
                               train_config: TrainConfig, folds: int, *, tracking_uri: str, experiment: str,
                               model_name: str, force: bool, promote: bool,
                               tags: dict[str, str] | None = None, fold_models: int = 1) -> TrainResult:
    """Load the annotated B-scans of each of ``volumes`` (one subject each), then cross-validate and register."""
    from octseg.tasks.training.dataset import load_volume_sets, source_digests

    sets = load_volume_sets(archive_path, volumes)
    check_volume_classes(sets, unet_config)
    get_run_logger().info("cross-validating over %d volumes (%d B-scans) in %d folds", len(sets),
                          sum(len(s) for s in sets.values()), folds)
    epochs = train_config.epochs * folds * fold_models
    with progress_bar("train epochs (all folds)", epochs) as bar:
        return crossval_and_register(sets, unet_config, train_config, folds, tracking_uri=tracking_uri,
                                     experiment=experiment, model_name=model_name, tags=tags, force=force,
                                     promote=promote, progress=progress_logger(bar, epochs, counted=True),
                                     fold_models=fold_models, trained_on=source_digests(archive_path, sorted(sets)))
