"""One frozen pydantic config per flow, nesting the settings objects of :mod:`octseg.unet.config`.

A default and its check live in one place: the network's in ``UNetConfig``, the optimiser's in
``TrainConfig``, inference's in ``InferenceConfig``, the border weights' in ``WeightMapConfig``; the
flow configs below only add what belongs to a flow (archive, volumes, where MLflow and Dask are).
The ``octseg`` command fills these objects (``--config FILE`` then its options, ``--show-config`` to
print them), and Prefect deployments pass them as the flows' parameters.

Defaults are the embedded ones: a Dask LocalCluster, MLflow in a SQLite file in the working
directory (or ``MLFLOW_TRACKING_URI``), the model ``octseg-unet@champion``. Each config is logged
once at the start of its flow.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from octseg.tasks.readers.limits import DEFAULT_MAX_VOXELS
from octseg.unet.config import InferenceConfig, TrainConfig, UNetConfig, WeightMapConfig

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_URI",
    "EvaluateConfig",
    "IngestConfig",
    "PipelineConfig",
    "PreprocessConfig",
    "SegmentConfig",
    "TrainFlowConfig",
    "WatchConfig",
    "dask_address_from_env",
    "load_config_file",
]

DEFAULT_MODEL_NAME = "octseg-unet"
DEFAULT_EXPERIMENT = "octseg"
DEFAULT_MODEL_URI = f"models:/{DEFAULT_MODEL_NAME}@champion"


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
    keep_identifiers: bool = False  # write vendor headers' patient identifiers (names, ids, birth dates)
    grader: int = Field(default=1, ge=1, le=2)  # whose manual labels a Duke .mat gives
    max_voxels: int | None = Field(default=DEFAULT_MAX_VOXELS, ge=1)  # refuse larger volumes from headers
    dask_address: str | None = Field(default_factory=dask_address_from_env)  # None: threads of this process


class PreprocessConfig(_Config):
    """Normalisation and border-weight maps, Dask-parallel over B-scans."""

    archive: Path
    volumes: tuple[str, ...] | None = None  # None: every volume in the archive
    dask_address: str | None = Field(default_factory=dask_address_from_env)  # None: LocalCluster
    n_workers: int = Field(default=2, ge=1)  # LocalCluster workers (processes)
    weights: WeightMapConfig = WeightMapConfig()


class TrainFlowConfig(_Config):
    """A U-Net on the annotated B-scans, tracked in MLflow and registered."""

    archive: Path
    volumes: tuple[str, ...] | None = None
    unet: UNetConfig = UNetConfig()  # the network; the paper's by default
    train: TrainConfig = TrainConfig()  # the optimisation; SGD with momentum 0.99 as in the paper
    val_fraction: float = Field(default=0.2, ge=0, lt=1)  # whole volumes held out when there are several
    val_volumes: tuple[str, ...] | None = None  # validate on these volumes (overrides val_fraction)
    # held out of training; the champion is chosen by the pooled fluid Dice on them. None: the
    # archive's fixed evaluation set (`octseg evaluate --fix`), if any, else the validation Dice
    evaluation_volumes: tuple[str, ...] | None = None
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    model_name: str = DEFAULT_MODEL_NAME
    force: bool = False  # train again even when an identical run (same data and configs) is registered
    resume: str | None = None  # MLflow run id to continue from its last checkpoint (same data and settings)


class SegmentConfig(_Config):
    """Bulk, resumable inference into ``labels/prediction``."""

    archive: Path
    model_uri: str = DEFAULT_MODEL_URI
    volumes: tuple[str, ...] | None = None
    tracking_uri: str | None = None
    inference: InferenceConfig = InferenceConfig()
    qc_dir: Path | None = None  # None: <archive>.qc beside the archive
    force: bool = False  # re-segment volumes already done by this model version
    dask_address: str | None = Field(default_factory=dask_address_from_env)  # None: a LocalCluster (n_workers)
    # LocalCluster workers; 0: segment in the flow's own process; None: one per GPU, else one per core (at most 4)
    n_workers: int | None = Field(default=None, ge=0)
    gpu: bool | None = None  # each volume asks for the Dask resource GPU=1; None: when a worker declares it

    @property
    def qc_folder(self) -> Path:
        """Where QC overlays go: ``qc_dir``, else ``<archive>.qc/`` beside the archive."""
        return self.qc_dir or self.archive.with_name(self.archive.name + ".qc")


class EvaluateConfig(_Config):
    """A registered model scored on the annotated B-scans of archive volumes."""

    archive: Path
    model_uri: str = DEFAULT_MODEL_URI
    volumes: tuple[str, ...] | None = None  # None: the archive's evaluation set, else every annotated volume
    tracking_uri: str | None = None
    inference: InferenceConfig = InferenceConfig()
    fix: bool = False  # record these volumes as the archive's fixed evaluation set


class PipelineConfig(_Config):
    """ingest -> preprocess -> train -> segment, on one archive."""

    ingest: IngestConfig
    preprocess: PreprocessConfig
    train: TrainFlowConfig
    segment: SegmentConfig

    @model_validator(mode="after")
    def _one_archive(self) -> PipelineConfig:
        archives = {str(c.archive.resolve()) for c in (self.ingest, self.preprocess, self.train, self.segment)}
        if len(archives) > 1:
            raise ValueError(f"the pipeline's stages must share one archive, got {sorted(archives)}")
        return self


def load_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file; ValueError naming the file otherwise."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path}: cannot be read ({e})") from None
    kind = "JSON" if Path(path).suffix.lower() == ".json" else "YAML"  # JSON is YAML too; .json is strict
    try:
        if kind == "JSON":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError: both name line and column
        raise ValueError(f"config file {path}: not valid {kind}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


class WatchConfig(_Config):
    """The drop folder: files new to the archive -> ingest -> preprocess -> segment with the champion."""

    inbox: Path
    archive: Path
    labels: Path | None = None  # masks with the same file names as the inbox's files (optional)
    settle_seconds: float = Field(default=60.0, ge=0)  # a file changed more recently is left for the next run
    model_uri: str = DEFAULT_MODEL_URI
    tracking_uri: str | None = None
    dask_address: str | None = Field(default_factory=dask_address_from_env)  # None: LocalClusters
    n_workers: int | None = Field(default=None, ge=0)  # segment's LocalCluster workers (see SegmentConfig)
    keep_identifiers: bool = False  # as IngestConfig
    max_voxels: int | None = Field(default=DEFAULT_MAX_VOXELS, ge=1)  # as IngestConfig
    inference: InferenceConfig = InferenceConfig()
    weights: WeightMapConfig = WeightMapConfig()

