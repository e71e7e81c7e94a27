"""The ``octseg`` command's settings and options: one config object per command, and the typer options
shared by its commands (their shown defaults are read from the config classes, never written twice).

:func:`settings` builds a command's config from ``--config FILE`` then the options given; the
``*Opt`` annotations are the options themselves. :mod:`octseg.flows.cli` defines the commands.
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from octseg.flows.config import IngestConfig, SegmentConfig, TrainFlowConfig, load_config_file

EXPLICIT_NONE = object()  # an option that sets a setting to None (e.g. --no-balanced over a config file)


# ---- settings: one config object per command ----------------------------------------------------

def _default(cls: Any, dotted: str) -> Any:
    """The default of ``dotted`` (e.g. ``"train.epochs"``) in a flow config class: shown by ``--help``,
    read from the config objects themselves so it is never written twice."""
    value: Any = cls
    for part in dotted.split("."):
        if isinstance(value, type) and hasattr(value, "model_fields"):
            field = value.model_fields[part]
            value = field.default_factory() if field.default_factory else field.default
        elif is_dataclass(value):
            value = {f.name: getattr(value, f.name) for f in fields(value)}[part]
        else:
            raise KeyError(dotted)
    return value


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config: {part} must be a mapping of settings, got {node!r}")
        data = node
    data[leaf] = value


def settings(cls: Any, config_file: Path | None, show: bool, options: dict[str, Any]) -> Any:
    """``cls`` from the config file, then every option given (``None`` = not given); ``--show-config``
    prints it as YAML (which ``--config`` reads back) and stops."""
    data = load_config_file(config_file) if config_file is not None else {}
    for dotted, value in options.items():
        if value is EXPLICIT_NONE:
            _set(data, dotted, None)
        elif value is not None:
            _set(data, dotted, [str(v) for v in value] if isinstance(value, (list, tuple)) else value)
    config = cls.model_validate(data)
    if show:
        import yaml

        typer.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
        raise typer.Exit(0)
    return config


def option(help: str, *decls: str, cls: Any = None, key: str | None = None, panel: str | None = None,
           metavar: str | None = None) -> Any:
    """A ``typer.Option`` whose shown default comes from ``cls`` at ``key``."""
    shown: Any = False
    if cls is not None and key is not None:
        default = _default(cls, key)
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
    return typer.Option(*decls, help=help, show_default=shown, rich_help_panel=panel, metavar=metavar)


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="YAML or JSON file of this command's settings; options given here override it.",
    rich_help_panel="Settings")]
ShowOpt = Annotated[bool, typer.Option(
    "--show-config", help="Print the settings this command would run with (YAML), then stop.",
    rich_help_panel="Settings")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", help="Also show third-party INFO logs (Dask, MLflow) and the tracebacks of failed items.",
    rich_help_panel="Settings")]
ArchiveOpt = Annotated[Optional[Path], typer.Option(
    "--archive", "-a", help="The OME-Zarr archive (a folder, created by ingest).", show_default=False)]
VolumesOpt = Annotated[Optional[list[str]], typer.Option(
    "--volume", "-v", help="Only this volume id (repeatable). Default: all.", show_default=False)]
TrackingOpt = Annotated[Optional[str], typer.Option(
    help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.", show_default=False)]
DaskOpt = Annotated[Optional[str], typer.Option(
    help="Dask scheduler (tcp://host:8786). Default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster.",
    show_default=False)]
SourcesArg = Annotated[Optional[list[Path]], typer.Argument(
    metavar="SOURCE", show_default=False,
    help="TIFF stacks, .npy files, 2-D images, folders of 2-D B-scans (one folder = one volume), or vendor "
         "exports: Heidelberg .vol/.e2e/HEYEX .xml, DICOM, Duke .mat; Topcon .fds/.fda, Zeiss .img and "
         "Bioptigen .oct with the 'vendor' extra.")]
LabelsOpt = Annotated[Optional[Path], typer.Option(
    help="Folder of manual masks with the same file names as the sources.", show_default=False)]
KeepIdsOpt = Annotated[Optional[bool], typer.Option(
    "--keep-identifiers/--no-keep-identifiers", show_default="no-keep-identifiers",
    help="Write the patient identifiers of vendor headers (names, ids, birth dates, free text) into the "
         "archive and name volumes after their files. Default: they stay out, and a file named after "
         "its patient gets an id from its content.")]
MaxVoxelsOpt = Annotated[Optional[int], option(
      "Refuse a volume larger than this many voxels, from its header (before decoding).",
      cls=IngestConfig, key="max_voxels")]

_T, _NET, _OPT, _INF = TrainFlowConfig, "Network (UNetConfig)", "Optimisation (TrainConfig)", "Inference"
# the training options shared by `train` and `pipeline`: (parameter name, key in TrainFlowConfig)
TRAIN_KEYS = {
    "classes": "unet.out_channels", "base_channels": "unet.base_channels", "depth": "unet.depth",
    "padding": "unet.padding", "batch_norm": "unet.batch_norm", "dropout": "unet.dropout", "up_mode": "unet.up_mode",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "optimizer": "train.optimizer", "lr": "train.lr",
    "momentum": "train.momentum", "weight_decay": "train.weight_decay", "tile_size": "train.tile_size",
    "max_tile": "train.max_tile", "tiles_per_epoch": "train.tiles_per_epoch",
    "foreground_fraction": "train.foreground_fraction", "dice_weight": "train.dice_weight",
    "augment": "train.augment", "seed": "train.seed",
    "device": "train.device", "amp": "train.amp", "val_fraction": "val_fraction",
    "tracking_uri": "tracking_uri", "experiment": "experiment", "model_name": "model_name", "force": "force",
    "patience": "train.patience", "restore_best": "train.restore_best", "resume": "resume",
    "num_workers": "train.num_workers", "processes": "train.processes", "val_volume": "val_volumes",
}
ClassesOpt = Annotated[Optional[int], option("Classes the network predicts (background + fluid = 2; raise it for "
                                             "masks with more labels).", "--classes", cls=_T, key="unet.out_channels",
                                             panel=_NET)]
BaseOpt = Annotated[Optional[int], option("Channels of the first level (the paper: 64).", cls=_T,
                                          key="unet.base_channels", panel=_NET)]
DepthOpt = Annotated[Optional[int], option("Number of 2x2 max-poolings (the paper: 4).", cls=_T, key="unet.depth",
                                           panel=_NET)]
PaddingOpt = Annotated[Optional[str], option("valid (the paper's unpadded convolutions) or same.", cls=_T,
                                             key="unet.padding", panel=_NET)]
BatchNormOpt = Annotated[Optional[bool], option("BatchNorm after each 3x3 conv (not in the paper).",
                                                "--batch-norm/--no-batch-norm", cls=_T, key="unet.batch_norm",
                                                panel=_NET)]
DropoutOpt = Annotated[Optional[float], option("Drop-out at the end of the contracting path.", cls=_T,
                                               key="unet.dropout", panel=_NET)]
UpModeOpt = Annotated[Optional[str], option("transpose (the paper's 2x2 up-convolution) or bilinear.", cls=_T,
                                            key="unet.up_mode", panel=_NET)]
EpochsOpt = Annotated[Optional[int], option("Training epochs.", cls=_T, key="train.epochs", panel=_OPT)]
BatchOpt = Annotated[Optional[int], option("Tiles per optimisation step.", cls=_T, key="train.batch_size", panel=_OPT)]
OptimOpt = Annotated[Optional[str], option("sgd (the paper's, with momentum) or adam.", cls=_T, key="train.optimizer",
                                           panel=_OPT)]
LrOpt = Annotated[Optional[float], option("Learning rate.", cls=_T, key="train.lr", panel=_OPT)]
MomentumOpt = Annotated[Optional[float], option("SGD momentum (the paper: 0.99).", cls=_T, key="train.momentum",
                                                panel=_OPT)]
DecayOpt = Annotated[Optional[float], option("Weight decay.", cls=_T, key="train.weight_decay", panel=_OPT)]
TileOpt = Annotated[Optional[int], option("Input tile (pixels); none: the largest valid tile <= --max-tile whose "
                                          "output fits the B-scan.", cls=_T, key="train.tile_size", panel=_OPT)]
MaxTileOpt = Annotated[Optional[int], option("Largest input tile the tile rule may pick (the paper: 572).", cls=_T,
                                             key="train.max_tile", panel=_OPT)]
TilesOpt = Annotated[Optional[int], option("Random tiles drawn per epoch.", cls=_T, key="train.tiles_per_epoch",
                                           panel=_OPT)]
FgOpt = Annotated[Optional[float], option("Share of tiles centred on foreground pixels.", cls=_T,
                                          key="train.foreground_fraction", panel=_OPT)]
DiceOpt = Annotated[Optional[float], option("Weight of a foreground soft-Dice term added to the paper's loss "
                                            "(nnU-Net: 1).", cls=_T, key="train.dice_weight", panel=_OPT)]
AugmentOpt = Annotated[Optional[bool], option("Elastic deformation, flips, grey-value jitter.",
                                              "--augment/--no-augment", cls=_T, key="train.augment", panel=_OPT)]
SeedOpt = Annotated[Optional[int], option("Random seed (tiles, split, initialisation).", cls=_T, key="train.seed",
                                          panel=_OPT)]
DeviceOpt = Annotated[Optional[str], option("auto (GPU when present), cpu, cuda or cuda:N.", cls=_T, key="train.device",
                                            panel=_OPT)]
AmpOpt = Annotated[Optional[bool], option("bfloat16 autocast on CUDA.", "--amp/--no-amp", cls=_T, key="train.amp",
                                          panel=_OPT)]
ValOpt = Annotated[Optional[float], option("Share held out for validation (whole volumes when there are several).",
                                           cls=_T, key="val_fraction", panel=_OPT)]
ValVolumeOpt = Annotated[Optional[list[str]], typer.Option(
    "--val-volume", help="Validate on this volume (repeatable; overrides --val-fraction).", show_default=False,
    rich_help_panel=_OPT)]
PatienceOpt = Annotated[Optional[int], option("Stop after this many epochs without a better validation Dice.", cls=_T,
                                              key="train.patience", panel=_OPT)]
RestoreOpt = Annotated[Optional[bool], option("End with the weights of the best validated epoch.",
                                              "--restore-best/--no-restore-best", cls=_T, key="train.restore_best",
                                              panel=_OPT)]
ResumeOpt = Annotated[Optional[str], option("Continue this MLflow run from its last checkpoint (an unfinished "
                                            "identical run is continued without it).", "--resume", metavar="RUN_ID")]
WorkersOpt = Annotated[Optional[int], option("Tile-loading worker processes (default: 0 on CPU, up to 4 on a GPU).",
                                             "--loader-workers", cls=_T, key="train.num_workers",
                                             panel=_OPT)]
ProcessesOpt = Annotated[Optional[int], option("Data-parallel training processes (DistributedDataParallel): one "
                                               "per GPU with NCCL, or CPU processes with gloo. The batch is split "
                                               "between them.",
                                               "--gpus", "--processes", cls=_T, key="train.processes", panel=_OPT)]
ExperimentOpt = Annotated[Optional[str], option("MLflow experiment.", cls=_T, key="experiment")]
ModelNameOpt = Annotated[Optional[str], option("Registered model name.", cls=_T, key="model_name")]
ForceTrainOpt = Annotated[Optional[bool], option("Train even if an identical run (same data and settings) is "
                                                 "registered.", "--force/--no-force", cls=_T, key="force")]


# the inference options shared by `segment` and `evaluate`: (parameter name, key in their configs)
_S = SegmentConfig
_INFERENCE_KEYS = {name: f"inference.{key}" for name, key in (
    ("tile_size", "tile_size"), ("max_tile", "max_tile"), ("overlap", "overlap"), ("batch_size", "batch_size"),
    ("device", "device"), ("amp", "amp"), ("whole", "whole"), ("tta", "tta"), ("memory_budget", "memory_budget_mb"),
    ("compile_model", "compile"))}
InfTileOpt = Annotated[Optional[int], option("Tile B-scans with this input tile (pixels) instead of whole passes.",
                                             cls=_S, key="inference.tile_size", panel=_INF)]
InfMaxTileOpt = Annotated[Optional[int], option("Largest tile when B-scans must be tiled.", cls=_S,
                                                key="inference.max_tile", panel=_INF)]
InfOverlapOpt = Annotated[Optional[float], option("Overlap of neighbouring output tiles (fraction), blended.", cls=_S,
                                                  key="inference.overlap", panel=_INF)]
InfBatchOpt = Annotated[Optional[int], option("B-scans (or tiles) per forward pass; none: what the memory budget "
                                              "holds.", cls=_S, key="inference.batch_size", panel=_INF)]
InfDeviceOpt = Annotated[Optional[str], option("auto (GPU when present), cpu, cuda or cuda:N.", cls=_S,
                                               key="inference.device", panel=_INF)]
InfAmpOpt = Annotated[Optional[bool], option("bfloat16 autocast on CUDA.", "--amp/--no-amp", cls=_S,
                                             key="inference.amp", panel=_INF)]
InfWholeOpt = Annotated[Optional[bool], option("A whole B-scan per forward pass when it fits the memory budget "
                                               "(--tiles: always overlap-tiles).", "--whole/--tiles", cls=_S,
                                               key="inference.whole", panel=_INF)]
InfTtaOpt = Annotated[Optional[bool], option("Test-time augmentation: average with the mirrored B-scan.",
                                             "--tta/--no-tta", cls=_S, key="inference.tta", panel=_INF)]
InfBudgetOpt = Annotated[Optional[int], option("Memory for one forward pass, MiB (none: half the free GPU memory, "
                                               "2048 on CPU).", "--memory-budget", cls=_S,
                                               key="inference.memory_budget_mb", panel=_INF, metavar="MIB")]
InfCompileOpt = Annotated[Optional[bool], option("torch.compile the network (GPU; slow first batch).",
                                                 "--compile/--no-compile", cls=_S, key="inference.compile",
                                                 panel=_INF)]


def inference_options(values: dict[str, Any]) -> dict[str, Any]:
    return {_INFERENCE_KEYS[k]: v for k, v in values.items() if k in _INFERENCE_KEYS}
