"""Train a U-Net inside ONE MLflow run, register it, and promote it to champion when it is better.

``octseg.unet.train.fit`` knows nothing of MLflow; :func:`train_and_register` hands it an ``on_epoch_end``
callback that logs ``train_loss`` and ``val_dice_<class>`` per epoch (step = epoch). The run is tagged
with the git commit and the Prefect flow-run id, carries both configs as params, a QC picture of a
validation B-scan (ground truth left, prediction right) and the registered model. A rerun on the same
data and settings reuses the registered run (:func:`find_previous_training`) or continues an unfinished
one from its checkpoint (:mod:`octseg.tasks.training.resume`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from octseg.tasks.archive.classes import DEFAULT_CLASS_NAMES, class_names_of
from octseg.tasks.runtime.progress import progress_bar
from octseg.tasks.segmentation.qc import side_by_side
from octseg.tasks.tracking.champion import FOREGROUND, REGISTERED, metric_of, promote_if_better
from octseg.tasks.tracking.models import find_registered_run, log_unet
from octseg.tasks.tracking.uri import client, ensure_experiment, using_tracking_uri
from octseg.tasks.training.resume import save_checkpoint, unfinished_run
from octseg.unet.config import TrainConfig, UNetConfig, fingerprint_settings

if TYPE_CHECKING:  # torch-free import: unet.data and unet.train import torch
    from octseg.unet.data import BScanSet
    from octseg.unet.train import EpochStats

__all__ = [
    "TrainResult",
    "check_classes",
    "check_volume_classes",
    "find_previous_training",
    "epoch_logger",
    "epoch_line",
    "progress_logger",
    "run_context_tags",
    "run_params",
    "train_and_register",
    "train_from_archive_task",
    "training_fingerprint",
]

log = logging.getLogger(__name__)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_context_tags() -> dict[str, str]:
    """Tags tying a run to its code and orchestration: git commit (+ dirty flag), Prefect flow-run id."""
    from prefect.runtime import flow_run

    tags: dict[str, str] = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["git_dirty"] = str(bool(status)).lower()
    if flow_run.id:
        tags["prefect_flow_run_id"] = str(flow_run.id)
    return tags


def run_params(unet_config: UNetConfig, train_config: TrainConfig, train: BScanSet, val: BScanSet | None,
            names: Mapping[int, str]) -> dict[str, Any]:
    """Both configs flattened (``unet.*``, ``train.*``) plus the data sizes (``data.*``)."""
    return {
        **{f"unet.{k}": v for k, v in unet_config.to_dict().items()},
        **{f"train.{k}": v for k, v in train_config.to_dict().items()},
        "data.n_train": len(train),
        "data.n_val": len(val) if val is not None else 0,
        "data.bscan_shape": "x".join(map(str, train.images.shape[1:])),
        "data.weight_maps": train.weights is not None,
        "data.classes": json.dumps({str(k): v for k, v in names.items()}),
    }


def _as_class_dict(dice: Mapping[int, float]) -> dict[int, float]:
    """Per-class Dice as plain {int: float} (no NumPy scalars in results or MLflow calls)."""
    return {int(c): float(d) for c, d in dice.items()}


def _dice_metrics(prefix: str, dice: dict[int, float], names: Mapping[int, str]) -> dict[str, float]:
    return {f"{prefix}_dice_{names[c]}": d for c, d in dice.items()}


def epoch_logger(names: Mapping[int, str], progress: Callable[[EpochStats], None] | None):
    """The ``on_epoch_end`` callback: one ``log_metrics`` call per epoch, step = epoch, then ``progress``."""
    import mlflow

    def on_epoch_end(stats: EpochStats) -> None:
        metrics = {"train_loss": stats.train_loss, "epoch_seconds": stats.seconds}
        metrics.update(_dice_metrics("val", _as_class_dict(stats.val_dice), names))
        mlflow.log_metrics(metrics, step=stats.epoch)
        if progress is not None:
            progress(stats)

    return on_epoch_end


def _log_qc(model, data: BScanSet, prefix: str, artifact_uri: str, train_config: TrainConfig) -> str:
    """Log ground truth | prediction of the B-scan with the most foreground; returns the artifact URI."""
    import mlflow

    from octseg.unet.inference import predict_probabilities
    from octseg.unet.train import validation_inference

    k = int(np.argmax((data.labels == FOREGROUND).sum(axis=(1, 2))))
    pred = predict_probabilities(model, data.images[k], validation_inference(train_config)).argmax(0)
    artifact_file = f"qc/{prefix}_bscan{k:03d}.png"
    mlflow.log_image(side_by_side(data.images[k], data.labels[k], pred), artifact_file=artifact_file)
    return f"{artifact_uri}/{artifact_file}"




@dataclass
class TrainResult:
    """What one training run produced; ``score`` is the final Dice of class 1 (validation if any)."""

    run_id: str
    model_name: str
    model_version: str
    val_dice: dict[int, float]  # final per-class Dice (on the training set when there is no validation set)
    score: float
    promoted: bool
    qc_image: str | None  # artifact URI of the QC PNG
    n_train: int = 0
    n_val: int = 0
    reused: bool = False  # an identical earlier run (same data, configs and model name) was found
    folds: int = 0  # a cross-validation ensemble of this many folds; ``score`` is then out of fold
    oof: dict | None = None  # its out-of-fold scores (OOFScores.to_dict())


def training_fingerprint(train: BScanSet, val: BScanSet | None, unet_config: UNetConfig,
                         train_config: TrainConfig, model_name: str) -> str:
    """sha256 over the training data, both configs and the model name: equal means "already trained".
    Speed-only settings, and settings added later while at their default, are left out
    (:func:`octseg.unet.config.fingerprint_settings`)."""
    settings = [fingerprint_settings(unet_config), fingerprint_settings(train_config), model_name]
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for data in (train, val):
        for arr in () if data is None else (data.images, data.labels, data.weights):
            h.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def find_previous_training(fingerprint: str, tracking_uri: str, experiment_id: str, model_name: str,
                           names: Mapping[int, str]) -> TrainResult | None:
    """The finished, registered run with this fingerprint, as a result (``reused=True``), or None."""
    found = find_registered_run(tracking_uri, experiment_id, model_name, "octseg.fingerprint", fingerprint)
    if found is None:
        return None
    run, version = found
    source = run.data.tags.get("octseg.score_source")
    prefix = {"validation": "val", "out-of-fold": "oof"}.get(source, "train")
    client_ = client(tracking_uri)
    dice = {c: v if (v := metric_of(client_, run.info.run_id, f"{REGISTERED}{prefix}_dice_{n}")) is not None
            else math.nan for c, n in names.items()}
    return TrainResult(run.info.run_id, model_name, version, dice, dice.get(FOREGROUND, math.nan), False, None,
                       n_train=int(run.data.params.get("data.n_train", 0)),
                       n_val=int(run.data.params.get("data.n_val", 0)), reused=True,
                       folds=int(run.data.params.get("folds", 0)))


def check_classes(train: BScanSet, val: BScanSet | None, unet_config: UNetConfig) -> None:
    """ValueError before any run starts when the masks hold a class the network cannot predict."""
    _check_classes({"the training B-scans": train, "the validation B-scans": val}, unet_config)


def check_volume_classes(sets: Mapping[str, BScanSet], unet_config: UNetConfig) -> None:
    """:func:`check_classes` per volume, so the error names the volume whose masks hold the class."""
    _check_classes({f"volume {v!r}": data for v, data in sets.items()}, unet_config)


def _check_classes(named: Mapping[str, BScanSet | None], unet_config: UNetConfig) -> None:
    for name, data in named.items():
        top = int(data.labels.max()) if data is not None and len(data) else 0
        if top >= unet_config.out_channels:
            raise ValueError(f"{name}: its masks hold class {top} but the network predicts {unet_config.out_channels} "
                             f"classes; binarise the masks or train with --classes {top + 1}")


def train_and_register(
    train: BScanSet,
    val: BScanSet | None,
    unet_config: UNetConfig,
    train_config: TrainConfig,
    *,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    class_names: Mapping[int, str] = DEFAULT_CLASS_NAMES,
    tags: Mapping[str, str] | None = None,
    progress: Callable[[EpochStats], None] | None = None,
    force: bool = False,
    promote: bool = True,
    resume_run_id: str | None = None,
    trained_on: Mapping[str, str | None] | None = None,
) -> TrainResult:
    """Train a fresh ``UNet(unet_config)`` in one MLflow run, register it as ``model_name``, maybe promote.

    A rerun on the same data with the same configs returns the earlier registered run (``reused``)
    instead of training again, unless ``force``. Every epoch the run's ``checkpoint/last.pt`` artifact
    is replaced; an identical run that never finished (killed, crashed) is continued from it in the
    same MLflow run, as is ``resume_run_id`` when given (it must have trained on the same data and
    settings).

    Promotion (unless ``promote`` is False: the flow then chooses the champion on its evaluation set)
    compares ``val_dice_<name of class 1>`` (``train_dice_...`` when ``val`` is None or empty, tagged
    ``octseg.score_source=training``) with the champion's value of the same metric. ``trained_on`` (volume id
    -> source SHA-256 of the volumes that trained or validated it) is stored with the model, for ``evaluate``.
    """
    import mlflow

    from octseg.unet.distributed import fit_distributed
    from octseg.unet.model import UNet
    from octseg.unet.train import evaluate, validation_inference

    check_classes(train, val, unet_config)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    names = class_names_of(unet_config.out_channels, class_names)
    has_val = val is not None and len(val) > 0
    prefix = "val" if has_val else "train"
    fingerprint = training_fingerprint(train, val if has_val else None, unet_config, train_config, model_name)
    if not force and (done := find_previous_training(fingerprint, tracking_uri, experiment_id, model_name, names)):
        log.info("identical training already registered as %s v%s (run %s)", model_name, done.model_version, done.run_id)
        return done
    run_tags = {**run_context_tags(), "octseg.score_source": "validation" if has_val else "training",
                "octseg.fingerprint": fingerprint, **(tags or {})}
    import torch

    torch.manual_seed(train_config.seed)  # the initial weights too: same data and settings, same model
    model = UNet.from_config(unet_config)
    run_id, state = unfinished_run(tracking_uri, experiment_id, fingerprint, resume_run_id)
    start = {"run_id": run_id} if run_id else {"experiment_id": experiment_id}
    with using_tracking_uri(tracking_uri), mlflow.start_run(**start, tags=run_tags) as run:
        if state is None:
            mlflow.log_params(run_params(unet_config, train_config, train, val, names))
        else:
            log.info("continuing run %s after epoch %d", run_id, state["epoch"])
        history = fit_distributed(model, train, val if has_val else None, train_config, train_config.processes,
                                  epoch_logger(names, progress), on_checkpoint=save_checkpoint, resume=state)
        if has_val:
            scored = _registered_epoch(history, train_config)
            dice = _as_class_dict(scored.val_dice)
            mlflow.set_tag("octseg.registered_epoch", str(scored.epoch))
        else:
            dice = _as_class_dict(evaluate(model, train, validation_inference(train_config)))
            mlflow.log_metrics(_dice_metrics("train", dice, names), step=history[-1].epoch)
        # the score of the weights registered (the best epoch's under restore_best): what promotion compares
        mlflow.log_metrics(_dice_metrics(f"{REGISTERED}{prefix}", dice, names))
        qc_image = _log_qc(model, val if has_val else train, prefix, run.info.artifact_uri, train_config)
        model.trained_on = dict(trained_on) if trained_on is not None else None
        version = log_unet(model, model_name, metadata={"class_names": {str(k): v for k, v in names.items()}})
    score = dice.get(FOREGROUND, math.nan)
    promoted = promote and promote_if_better(model_name, version, score, tracking_uri,
                                             metric=f"{REGISTERED}{prefix}_dice_{names[FOREGROUND]}")
    return TrainResult(run.info.run_id, model_name, version, dice, score, promoted, qc_image,
                       n_train=len(train), n_val=len(val) if has_val else 0)


def _registered_epoch(history: list[EpochStats], train_config: TrainConfig) -> EpochStats:
    """The epoch whose weights ``fit`` ended with: the best validated one under ``restore_best``."""
    scored = [h for h in history if not math.isnan(h.val_dice.get(FOREGROUND, math.nan))]
    if not train_config.restore_best or not scored:
        return history[-1]
    return max(scored, key=lambda h: (h.val_dice[FOREGROUND], -h.epoch))


def progress_logger(bar: Callable[[int, int], None] | None = None, epochs: int = 0,
                    counted: bool = False) -> Callable[[EpochStats], None]:
    """Log each epoch to the Prefect run logger and advance ``bar(done, total)`` when given: to the epoch's
    number, or (``counted``: several trainings in a row, e.g. folds) by one per epoch."""
    logger = get_run_logger()
    done = [0]

    def progress(stats: EpochStats) -> None:
        logger.info(epoch_line(stats))
        done[0] = done[0] + 1 if counted else stats.epoch + 1
        if bar is not None:
            bar(done[0], epochs)

    return progress


def epoch_line(stats: EpochStats) -> str:
    """One epoch's log line: its loss, its validation Dice per class when it had validation (folds have none),
    its time."""
    dice = {c: round(d, 4) for c, d in _as_class_dict(stats.val_dice).items()}
    scored = f", val Dice {dice}" if dice else ""
    return f"epoch {stats.epoch}: loss {stats.train_loss:.4f}{scored} ({stats.seconds:.1f} s)"


@task(name="train-unet-from-archive", cache_policy=NO_CACHE)
def train_from_archive_task(archive_path: str, volumes: list[str], unet_config: UNetConfig,
                            train_config: TrainConfig, *, val_fraction: float, tracking_uri: str,
                            experiment: str, model_name: str, force: bool, promote: bool,
                            resume_run_id: str | None = None, tags: dict[str, str] | None = None,
                            val_volumes: list[str] | None = None) -> TrainResult:
    """Load the annotated B-scans of ``volumes`` from the archive, split them, then train and register."""
    from octseg.tasks.training.dataset import load_volume_sets, source_digests, split_train_val

    sets = load_volume_sets(archive_path, volumes)
    check_volume_classes(sets, unet_config)
    train, val = split_train_val(sets, val_fraction, train_config.seed, val_volumes)
    get_run_logger().info("training on %d B-scans, validating on %d", len(train), 0 if val is None else len(val))
    with progress_bar("train epochs", train_config.epochs) as bar:
        return train_and_register(train, val, unet_config, train_config, tracking_uri=tracking_uri,
                                  experiment=experiment, model_name=model_name,
                                  progress=progress_logger(bar, train_config.epochs), force=force,
                                  promote=promote, resume_run_id=resume_run_id, tags=tags,
                                  trained_on=source_digests(archive_path, sorted(sets)))
