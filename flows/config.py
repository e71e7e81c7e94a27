"""One frozen pydantic config per flow.

Defaults are the embedded ones: a Dask LocalCluster, MLflow in a SQLite file in the working
directory (or ``MLFLOW_TRACKING_URI``), the model ``octseg-unet@champion``. Each config is logged
once at the start of its flow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "IngestConfig",
    "PreprocessConfig",
    "TrainFlowConfig",
    "SegmentConfig",
    "PipelineConfig",
    "dask_address_from_env",
]


def dask_address_from_env() -> str | None:
    """The scheduler address Dask itself reads (``DASK_SCHEDULER_ADDRESS``), or None for a LocalCluster."""
    return os.environ.get("DASK_SCHEDULER_ADDRESS") or None


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestConfig(_Config):
    """Files -> archive. A folder of 2-D images is one volume; every other file is one volume."""

    sources: tuple[Path, ...] = Field(min_length=1)
    archive: Path
    labels: Path | None = None  # folder of masks with the same file names as the sources

    @field_validator("sources")
    @classmethod
    def _sources_exist(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        missing = [str(p) for p in v if not Path(p).exists()]
        if missing:
            raise ValueError(f"source(s) not found: {', '.join(missing)}")
        return v


class PreprocessConfig(_Config):
    """Normalisation and border-weight maps, Dask-parallel over B-scans."""

    archive: Path
    volumes: tuple[str, ...] | None = None  # None: every volume in the archive
    dask_address: str | None = Field(default_factory=dask_address_from_env)  # None: LocalCluster
    n_workers: int = Field(default=2, ge=1)  # LocalCluster workers (processes)
    w0: float = Field(default=10.0, ge=0)
    sigma: float = Field(default=5.0, gt=0)
    class_weights: Literal["balanced"] | None = None


class TrainFlowConfig(_Config):
    """A U-Net on the annotated B-scans, tracked in MLflow and registered."""

    archive: Path
    volumes: tuple[str, ...] | None = None
    # the network (unet.UNetConfig); the defaults are the paper's
    base_channels: int = Field(default=64, ge=1)
    depth: int = Field(default=4, ge=1)
    padding: Literal["valid", "same"] = "valid"
    batch_norm: bool = False
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # optimisation (unet.train.TrainConfig); SGD with momentum 0.99 as in the paper
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=4, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.99, ge=0, lt=1)
    tiles_per_epoch: int = Field(default=64, ge=1)
    foreground_fraction: float = Field(default=0.33, ge=0, le=1)  # tiles centred near fluid
    tile_size: int | None = None
    max_tile: int = Field(default=256, ge=16)
    augment: bool = True
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"
    # tracking
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    experiment: str = "octseg"
    model_name: str = "octseg-unet"
    force: bool = False  # train again even when an identical run (same data and configs) is registered


class SegmentConfig(_Config):
    """Bulk, resumable inference into ``labels/prediction``."""

    archive: Path
    model_uri: str = "models:/octseg-unet@champion"
    volumes: tuple[str, ...] | None = None
    tracking_uri: str | None = None
    device: str = "auto"
    tile_size: int | None = None
    overlap: float = Field(default=0.25, ge=0, lt=1)
    batch_size: int = Field(default=4, ge=1)
    qc_dir: Path | None = None  # None: <archive>.qc beside the archive
    force: bool = False  # re-segment volumes already done by this model version


class PipelineConfig(_Config):
    """ingest -> preprocess -> train -> segment."""

    ingest: IngestConfig
    preprocess: PreprocessConfig
    train: TrainFlowConfig
    segment: SegmentConfig
