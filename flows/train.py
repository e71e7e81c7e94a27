"""Flow ``train-unet``: a U-Net on the annotated B-scans, tracked and registered in MLflow."""
from __future__ import annotations

from prefect import flow, get_run_logger

from octseg.flows.config import TrainFlowConfig
from octseg.flows.preprocess import select_volumes
from octseg.flows.summary import TrainSummary
from octseg.tasks.tracking import resolve_tracking_uri
from octseg.tasks.training import train_from_archive_task
from octseg.unet.config import UNetConfig
from octseg.unet.train import TrainConfig

__all__ = ["train_unet", "unet_config_of", "train_config_of"]


def unet_config_of(config: TrainFlowConfig) -> UNetConfig:
    """The network part of the flow config (2 classes: background, fluid)."""
    return UNetConfig(
        in_channels=1, out_channels=2, base_channels=config.base_channels, depth=config.depth,
        padding=config.padding, batch_norm=config.batch_norm, dropout=config.dropout,
    )


def train_config_of(config: TrainFlowConfig) -> TrainConfig:
    """The optimisation part of the flow config."""
    return TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, optimizer=config.optimizer, lr=config.lr,
        momentum=config.momentum, tile_size=config.tile_size, max_tile=config.max_tile,
        tiles_per_epoch=config.tiles_per_epoch, foreground_fraction=config.foreground_fraction,
        augment=config.augment, seed=config.seed, device=config.device,
    )


@flow(name="train-unet")
def train_unet(config: TrainFlowConfig) -> TrainSummary:
    """Load annotated B-scans, train, log to MLflow, register, promote to champion when better."""
    logger = get_run_logger()
    logger.info("train config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    volumes = select_volumes(config.archive, config.volumes)
    r = train_from_archive_task(
        str(config.archive), volumes, unet_config_of(config), train_config_of(config),
        val_fraction=config.val_fraction, tracking_uri=tracking_uri,
        experiment=config.experiment, model_name=config.model_name, force=config.force,
    )
    summary = TrainSummary(
        run_id=r.run_id, model_name=r.model_name, model_version=r.model_version, score=r.score,
        promoted=r.promoted, tracking_uri=tracking_uri, n_train=r.n_train, n_val=r.n_val, qc_image=r.qc_image,
        reused=r.reused,
    )
    logger.info(summary.headline())
    return summary
