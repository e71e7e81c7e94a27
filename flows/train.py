"""Flow ``train-unet``: a U-Net on the annotated B-scans, tracked and registered in MLflow."""
from __future__ import annotations

import json

from prefect import flow, get_run_logger

from octseg.flows.config import TrainFlowConfig
from octseg.flows.plans import training_volumes
from octseg.flows.summary import TrainSummary
from octseg.tasks.segmentation.evaluation import choose_champion_task, HELD_OUT_TAG
from octseg.tasks.tracking.uri import resolve_tracking_uri
from octseg.tasks.training.crossval import crossval_from_archive_task
from octseg.tasks.training.train import train_from_archive_task
from octseg.unet.train import validation_inference

__all__ = ["train_unet"]


@flow(name="train-unet")
def train_unet(config: TrainFlowConfig) -> TrainSummary:
    """Load annotated B-scans, train (one model, or with ``folds`` a cross-validation ensemble scored out of
    fold), log to MLflow, register; then choose the champion: on the evaluation set when there is one (both
    versions scored on it), else on validation (or out-of-fold) Dice."""
    logger = get_run_logger()
    logger.info("train config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    volumes, evaluation = training_volumes(config)
    tags = {HELD_OUT_TAG: json.dumps(sorted(evaluation))} if evaluation else None
    if config.folds:
        r = crossval_from_archive_task(
            str(config.archive), volumes, config.unet, config.train, config.folds, tracking_uri=tracking_uri,
            experiment=config.experiment, model_name=config.model_name, force=config.force,
            promote=not evaluation, tags=tags, fold_models=config.fold_models)
    else:
        r = train_from_archive_task(
            str(config.archive), volumes, config.unet, config.train, val_fraction=config.val_fraction,
            tracking_uri=tracking_uri, experiment=config.experiment, model_name=config.model_name,
            force=config.force, promote=not evaluation, resume_run_id=config.resume, tags=tags,
            val_volumes=list(config.val_volumes) if config.val_volumes else None)
    summary = TrainSummary.from_result(r, tracking_uri)
    if evaluation:
        chosen = choose_champion_task(str(config.archive), evaluation, r.model_name, r.model_version, tracking_uri,
                                      validation_inference(config.train))
        summary.eval_score, summary.eval_set = chosen["score"], chosen["fingerprint"]
        summary.promoted, summary.champion_version = chosen["promoted"], chosen["champion"]
    logger.info(summary.headline())
    return summary
