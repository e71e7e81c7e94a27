"""One frozen pydantic config per flow, nesting the settings objects of :mod:`octseg.unet.config`.

A setting is declared once, with its type, default, check and help sentence (``Field(description=...)``):
the network's in ``UNetConfig``, the optimiser's in ``TrainConfig``, inference's in ``InferenceConfig``,
the border weights' in ``WeightMapConfig``; the flow configs below only add what belongs to a flow
(archive, volumes, where MLflow and Dask are), and settings that several flows share are declared once
as annotated types (``Archive``, ``Volumes``, ...). The ``octseg`` command derives its options and
``--help`` from these declarations (:mod:`octseg.flows.cli_options`) and fills these objects
(``--config FILE`` then its options, ``--show-config`` to print them); Prefect deployments pass them as
the flows' parameters, and their UI shows the same sentences.

Defaults are the embedded ones: a Dask LocalCluster, MLflow in a SQLite file in the working
directory (or ``MLFLOW_TRACKING_URI``), the model ``octseg-unet@champion``. Each config is logged
once at the start of its flow.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from octseg.tasks.readers.limits import DEFAULT_MAX_VOXELS
from octseg.tasks.readers.registry import format_summary, reader_options_model
from octseg.unet.config import Cli, InferenceConfig, TrainConfig, UNetConfig, WeightMapConfig

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_URI",
    "CatalogueConfig",
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


NETWORK, OPTIMISATION, INFERENCE = "Network (UNetConfig)", "Optimisation (TrainConfig)", "Inference"
"""``--help`` panels of the nested configs' settings (and of the flow settings that belong with them)."""
PANELS: dict[type, str | None] = {UNetConfig: NETWORK, TrainConfig: OPTIMISATION, InferenceConfig: INFERENCE,
                                  WeightMapConfig: None}

# ---- settings that several flows share: each declared once here ------------------------------------
Archive = Annotated[Path, Cli("--archive", "-a", show_default=False),
                    Field(description="The OME-Zarr archive (a folder, created by ingest).")]
Volumes = Annotated[tuple[str, ...] | None, Cli("--volume", "-v", show_default=False),
                    Field(description="Only this volume id (repeatable). Default: all.")]
TrackingURI = Annotated[str | None, Cli(show_default=False), Field(
    description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.")]
DaskAddress = Annotated[str | None, Cli(show_default=False), Field(
    default_factory=dask_address_from_env,
    description="Dask scheduler (tcp://host:8786). Default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster.")]
Labels = Annotated[Path | None, Cli(show_default=False),
                   Field(description="Folder of manual masks with the same file names as the sources.")]
KeepIdentifiers = Annotated[bool, Cli("--keep-identifiers/--no-keep-identifiers", show_default="no-keep-identifiers"),
                            Field(strict=True, description=(
    "Write the patient identifiers of vendor headers (names, ids, birth dates, free text) into the archive and name "
    "volumes after their files. Default: they stay out, and a file named after its patient gets an id from its "
    "content."))]
ReaderOptions = reader_options_model(keep_identifiers=(KeepIdentifiers, False))
"""The reader options, one typed mapping: ``keep_identifiers`` and the options the readers declare
(:func:`octseg.tasks.readers.registry.reader_options_model`; Duke's ``grader``)."""
MaxVoxels = Annotated[int | None, Field(ge=1, strict=True, description=(
    "Refuse a volume larger than this many voxels, from its header (before decoding)."))]
PerTask = Annotated[int | None, Cli(show_default="grows with the run"), Field(ge=1, strict=True, description=(
    "Items (files or volumes) per Prefect task run. Default: one each for runs of up to 100, then batches that "
    "keep a run near 100 task runs (at most 200 items each); a failed item always gets a Failed task run of its "
    "own."))]
ModelURI = Annotated[str, Cli("--model"),
                     Field(description="Model URI: models:/NAME@ALIAS or models:/NAME/VERSION.")]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestConfig(_Config):
    """Files -> archive. A folder of 2-D images is one volume; every other file is one volume."""

    sources: Annotated[tuple[Path, ...], Cli(argument=True, metavar="SOURCE", show_default=False)] = Field(
        default=(), description=format_summary())
    sources_file: Annotated[Path | None, Cli(show_default=False)] = Field(None, description=(
        "A text file naming one source per line, ingested with the SOURCE arguments: for more files than a command "
        "line holds (or a Prefect flow run's parameters: 512 KB)."))
    archive: Archive
    labels: Labels = None
    reader_options: ReaderOptions = ReaderOptions()  # keep_identifiers, and what each reader declares (grader)
    max_voxels: MaxVoxels = DEFAULT_MAX_VOXELS
    dask_address: Annotated[str | None, Cli(show_default=False)] = Field(
        default_factory=dask_address_from_env, description=(
            "Dask scheduler (tcp://host:8786) whose workers read and write the files (they must see the same "
            "paths). Default: $DASK_SCHEDULER_ADDRESS, else threads of this command."))
    per_task: PerTask = None

    @model_validator(mode="after")
    def _some_source(self) -> IngestConfig:
        if not self.sources and self.sources_file is None:
            raise ValueError("no source given: name files or folders (SOURCE), or --sources-file")
        return self

    def all_sources(self) -> tuple[Path, ...]:
        """The SOURCE arguments, then the lines of ``sources_file`` (blank lines left out), each path once
        (``a.tif ./a.tif $PWD/a.tif`` name one file: it is ingested once)."""
        return tuple(Path(name) for name in self.source_names())

    def source_names(self) -> list[str]:
        """:meth:`all_sources` as strings, without making a ``Path`` of each (a plan of 100,000 files)."""
        given = [str(s) for s in self.sources]
        if self.sources_file is not None:
            try:
                text = Path(self.sources_file).read_text(encoding="utf-8", errors="surrogateescape")
            except OSError as e:
                raise ValueError(f"sources file {self.sources_file}: cannot be read ({e.strerror or e})") from None
            given += [_as_path(line) for line in text.splitlines() if line.strip()]
        return _once(given)


def _once(names: list[str]) -> list[str]:
    """``names`` without repeats of one path (the first kept), however each is written."""
    seen: set[str] = set()
    unique = []
    for name in names:
        key = os.path.abspath(name)
        if key not in seen:
            seen.add(key)
            unique.append(name)
    return unique


def _as_path(name: str) -> str:
    """``str(Path(name))`` (no trailing slash, no ``.`` parts, no doubled slashes), without a ``Path`` where the
    name is already in that form."""
    if name.endswith("/") or "//" in name or "/./" in name or name.startswith("./") or name.endswith("/."):
        return str(Path(name))
    return name


class PreprocessConfig(_Config):
    """Normalisation and border-weight maps, Dask-parallel over B-scans."""

    archive: Archive
    volumes: Volumes = None
    dask_address: DaskAddress
    n_workers: Annotated[int, Cli("--workers")] = Field(default=2, ge=1, strict=True,
                                                        description="LocalCluster worker processes.")
    weights: WeightMapConfig = WeightMapConfig()
    per_task: PerTask = None


class TrainFlowConfig(_Config):
    """A U-Net on the annotated B-scans, tracked in MLflow and registered."""

    archive: Archive
    volumes: Volumes = None
    unet: UNetConfig = UNetConfig()  # the network; the paper's by default
    train: TrainConfig = TrainConfig()  # the optimisation; SGD with momentum 0.99 as in the paper
    val_fraction: Annotated[float, Cli(panel=OPTIMISATION)] = Field(default=0.2, ge=0, lt=1, description=(
        "Share held out for validation (whole volumes when there are several)."))
    val_volumes: Annotated[tuple[str, ...] | None, Cli("--val-volume", panel=OPTIMISATION, show_default=False)] = Field(
        None, description="Validate on this volume (repeatable; overrides --val-fraction).")
    folds: Annotated[int | None, Cli(panel=OPTIMISATION)] = Field(None, ge=2, strict=True, description=(
        "Cross-validate: train this many models, each with whole volumes (subjects) held out, and register "
        "their ensemble with its out-of-fold Dice (no validation split; none: one model)."))
    fold_models: Annotated[int, Cli(panel=OPTIMISATION)] = Field(1, ge=1, strict=True, description=(
        "With --folds: models trained per fold, each from its own initial weights and tiles, their softmax "
        "averaged for the fold's out-of-fold labels; the registered ensemble holds folds x this many."))
    evaluation_volumes: Annotated[tuple[str, ...] | None, Cli(hidden=True)] = Field(None, description=(
        "Held out of training; the champion is chosen by the pooled fluid Dice on them. None: the archive's fixed "
        "evaluation set (`octseg evaluate --fix`), if any, else the validation Dice."))
    tracking_uri: TrackingURI = None
    experiment: str = Field(DEFAULT_EXPERIMENT, description="MLflow experiment.")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="Registered model name.")
    force: bool = Field(False, strict=True, description=(
        "Train even if an identical run (same data and settings) is registered."))
    resume: Annotated[str | None, Cli(metavar="RUN_ID", show_default=False)] = Field(None, description=(
        "Continue this MLflow run from its last checkpoint (an unfinished identical run is continued without it)."))


    @model_validator(mode="after")
    def _folds_hold_out_their_own(self) -> TrainFlowConfig:
        if self.folds is not None and self.val_volumes:
            raise ValueError("with folds the held-out subjects of each fold are its test set: drop --val-volume "
                             "(val_volumes)")
        if self.fold_models > 1 and self.folds is None:
            raise ValueError("fold_models needs folds (several models per cross-validation fold)")
        return self


class SegmentConfig(_Config):
    """Bulk, resumable inference into ``labels/prediction``."""

    archive: Archive
    model_uri: ModelURI = DEFAULT_MODEL_URI
    volumes: Volumes = None
    tracking_uri: TrackingURI = None
    inference: InferenceConfig = InferenceConfig()
    qc_dir: Annotated[Path | None, Cli(show_default=False)] = Field(
        None, description="Where QC overlays go. Default: <archive>.qc")
    force: bool = Field(False, strict=True, description="Re-segment volumes this model version already did.")
    dask_address: DaskAddress
    n_workers: Annotated[int | None, Cli("--workers")] = Field(default=None, ge=0, strict=True, description=(
        "LocalCluster worker processes when no scheduler is given (none: one per GPU, else one per core up to 4); "
        "0: segment in this process."))
    gpu: bool | None = Field(None, strict=True, description=(
        "Each volume asks its Dask worker for the resource GPU=1 (default: when a worker declares one)."))
    per_task: PerTask = None

    @property
    def qc_folder(self) -> Path:
        """Where QC overlays go: ``qc_dir``, else ``<archive>.qc/`` beside the archive."""
        return self.qc_dir or self.archive.with_name(self.archive.name + ".qc")


class EvaluateConfig(_Config):
    """A registered model scored on the annotated B-scans of archive volumes."""

    archive: Archive
    model_uri: ModelURI = DEFAULT_MODEL_URI
    volumes: Annotated[tuple[str, ...] | None, Cli("--volume", "-v", show_default=False)] = Field(None, description=(
        "Evaluate on this volume (repeatable; one that trained the model is scored but marked NOT HELD OUT). "
        "Default: the archive's fixed evaluation set, else every annotated volume that did not train the model."))
    tracking_uri: TrackingURI = None
    inference: InferenceConfig = InferenceConfig()
    fix: bool = Field(False, strict=True, description=(
        "Record these volumes as the archive's fixed evaluation set: training then holds them out and chooses the "
        "champion by its score on them."))


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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (a second ``epochs`` is a mistake, not an override)."""
    keys = [k for k, _ in pairs]
    if doubled := sorted({k for k in keys if keys.count(k) > 1}):
        raise ValueError(f"key(s) {doubled} given twice in one object")
    return dict(pairs)


def _yaml_unique_keys(text: str) -> Any:
    """``yaml.safe_load``, refusing a key given twice in one mapping (YAML 1.2 forbids it; PyYAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader


def load_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file; ValueError naming the file otherwise."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path}: cannot be read ({e})") from None
    kind = "JSON" if Path(path).suffix.lower() == ".json" else "YAML"  # JSON is YAML too; .json is strict
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if kind == "JSON" else _yaml_unique_keys(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError: both name line and column
        raise ValueError(f"config file {path}: not valid {kind}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


class WatchConfig(_Config):
    """The drop folder: files new to the archive -> ingest -> preprocess -> segment with the champion."""

    inbox: Annotated[Path, Cli(show_default=False)] = Field(
        description="The drop folder: volume files or folders of B-scans.")
    archive: Archive
    labels: Labels = None
    settle_seconds: float = Field(default=60.0, ge=0, description=(
        "Leave files changed more recently than this for the next run."))
    model_uri: Annotated[str, Cli("--model")] = Field(DEFAULT_MODEL_URI, description="Model URI to segment with.")
    tracking_uri: TrackingURI = None
    dask_address: DaskAddress
    n_workers: Annotated[int | None, Cli("--workers")] = Field(default=None, ge=0, strict=True, description=(
        "Segment's LocalCluster workers (0: in this process)."))
    reader_options: ReaderOptions = ReaderOptions()  # as IngestConfig
    max_voxels: MaxVoxels = DEFAULT_MAX_VOXELS
    inference: InferenceConfig = InferenceConfig()
    weights: WeightMapConfig = WeightMapConfig()


class CatalogueConfig(_Config):
    """The archive's catalogue (``<archive>.catalogue.sqlite``): what the plans read instead of every volume."""

    archive: Archive
    rebuild: bool = Field(False, strict=True, description=(
        "Forget the catalogue's volume rows and read every volume again (it is also rebuilt on its own when "
        "missing or damaged, and any row whose volume changed is read again when used)."))
