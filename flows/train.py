"""Flow ``train-unet``: a U-Net on the annotated B-scans, tracked and registered in MLflow."""
from __future__ import annotations

from prefect import flow, get_run_logger

from octseg.flows.config import TrainFlowConfig
from octseg.flows.summary import TrainSummary
from octseg.tasks.tracking import resolve_tracking_uri
from octseg.tasks.archive import select_volumes
from octseg.tasks.training import train_from_archive_task

__all__ = ["train_unet"]


@flow(name="train-unet")
def train_unet(config: TrainFlowConfig) -> TrainSummary:
    """Load annotated B-scans, train, log to MLflow, register, promote to champion when better."""
    logger = get_run_logger()
    logger.info("train config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    volumes = select_volumes(config.archive, config.volumes)
    r = train_from_archive_task(
        str(config.archive), volumes, config.unet, config.train, val_fraction=config.val_fraction,
        tracking_uri=tracking_uri, experiment=config.experiment, model_name=config.model_name, force=config.force,
    )
    summary = TrainSummary.from_result(r, tracking_uri)
    logger.info(summary.headline())
    return summary
