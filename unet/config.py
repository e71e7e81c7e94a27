"""Every setting of the U-Net, its training, its inference and its weight maps, each declared once.

A setting is one line: its name, type, default, check (pydantic ``Field`` constraints) and the sentence
that explains it (``description``). Everything else follows from that line: validation (once, by
pydantic, where a config is built), the flows' configs that nest these objects, the ``octseg``
command's options and ``--help`` (:mod:`octseg.flows.cli_options` derives them), ``--config`` files and
``--show-config``, the MLflow params of a run and its fingerprint. :class:`Cli` says how a setting is
named on the command line when not ``--<name>``; :data:`SPEED_ONLY` marks settings that change how
fast a result comes, not the result (left out of the training fingerprint); :data:`ADDED_LATER` marks a
setting added after models were trained without it, at a default that does what they did (left out of the
fingerprint while at that default, so those runs still count as "already trained").

The configs are frozen (pydantic) dataclasses. :class:`UNetConfig` is saved with every trained model so
that inference rebuilds exactly the same network (``UNet.from_config(UNetConfig.from_dict(saved))``).
The defaults are the paper's (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597); every departure from
it is a setting that defaults to off. Adding a setting is one field here (plus its use).

This module imports only pydantic and the standard library, so the command line reads the defaults
without paying for torch.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

__all__ = [
    "MAX_TILE",
    "PADDINGS",
    "ADDED_LATER",
    "SPEED_ONLY",
    "UP_MODES",
    "Cli",
    "InferenceConfig",
    "PostprocessConfig",
    "TrainConfig",
    "UNetConfig",
    "WeightMapConfig",
    "affects_result",
    "fingerprint_settings",
]

Padding = Literal["valid", "same"]
UpMode = Literal["transpose", "bilinear"]
Optimizer = Literal["sgd", "adam"]
PADDINGS: tuple[str, ...] = get_args(Padding)
UP_MODES: tuple[str, ...] = get_args(UpMode)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)

MAX_TILE = 572
"""Largest network input tile (pixels per side) for training and inference: the paper's 572x572."""


@dataclasses.dataclass(frozen=True)
class Cli:
    """How a setting appears on the ``octseg`` command line, where it differs from ``--<name>``.

    ``flags``: the option's names (a ``--x/--y`` pair for a switch); ``panel``: the ``--help`` group;
    ``metavar``; ``show_default``: False where the help sentence explains the default, or the text to
    show; ``hidden``: config files only; ``argument``: positional; ``flag_value``: a switch that sets
    this value when on and None when off (e.g. ``--balanced/--no-balanced``).
    """

    flags: tuple[str, ...] = ()
    panel: str | None = None
    metavar: str | None = None
    show_default: bool | str | None = None
    hidden: bool = False
    argument: bool = False
    flag_value: Any = None

    def __init__(self, *flags: str, **kwargs: Any) -> None:
        object.__setattr__(self, "flags", flags)
        for f in dataclasses.fields(self)[1:]:
            object.__setattr__(self, f.name, kwargs.pop(f.name, f.default))
        if kwargs:
            raise TypeError(f"Cli: unknown arguments {sorted(kwargs)}")


class _SpeedOnly:
    """Marker: the setting changes how fast a run goes, not what it trains (see :func:`affects_result`)."""

    def __repr__(self) -> str:
        return "SPEED_ONLY"


SPEED_ONLY = _SpeedOnly()


class _AddedLater:
    """Marker: a setting whose default does what runs trained before it existed did (see
    :func:`fingerprint_settings`)."""

    def __repr__(self) -> str:
        return "ADDED_LATER"


ADDED_LATER = _AddedLater()

_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _check_device(device: str) -> str:
    """"auto" or a torch device ("cpu", "cuda", "cuda:N", "mps", "xpu"); whether it is there is checked
    when a model is moved to it."""
    if not _DEVICE.match(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu', got {device!r}")
    return device


Device = Annotated[str, AfterValidator(_check_device)]
_FORBID = ConfigDict(extra="forbid")  # unknown keys are an error, never ignored


class _Config:
    """``to_dict``/``from_dict`` shared by the configs below (unknown keys are an error, never ignored)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields, e.g. to store beside the weights."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Rebuild a config from ``to_dict()`` output; missing keys take the defaults."""
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


def affects_result(config: type, name: str) -> bool:
    """False for a setting marked :data:`SPEED_ONLY` (e.g. tile-loading processes)."""
    return SPEED_ONLY not in config.__pydantic_fields__[name].metadata  # type: ignore[attr-defined]


def fingerprint_settings(config: Any) -> dict[str, Any]:
    """The settings of ``config`` that decide what a run trains: ``to_dict()`` less the settings marked
    :data:`SPEED_ONLY`, and less those marked :data:`ADDED_LATER` while they keep their default."""
    fields = type(config).__pydantic_fields__
    return {k: v for k, v in config.to_dict().items() if affects_result(type(config), k)
            and not (ADDED_LATER in fields[k].metadata and v == fields[k].default)}


@dataclass(frozen=True, config=_FORBID)
class UNetConfig(_Config):
    """The U-Net's architecture; defaults reproduce the paper's network (31,030,658 parameters)."""

    in_channels: Annotated[int, Cli(hidden=True)] = Field(
        1, ge=1, strict=True, description="Channels of the input image (1 for grey-value OCT B-scans).")
    out_channels: Annotated[int, Cli("--classes")] = Field(
        2, ge=2, strict=True, description="Classes the network predicts (background + fluid = 2; raise it for "
                                          "masks with more labels).")
    base_channels: int = Field(64, ge=1, strict=True, description="Channels of the first level (the paper: 64).")
    depth: int = Field(4, ge=1, strict=True, description="Number of 2x2 max-poolings (the paper: 4).")
    padding: Padding = Field("valid", description="valid (the paper's unpadded convolutions) or same.")
    batch_norm: bool = Field(False, strict=True, description="BatchNorm after each 3x3 conv (not in the paper).")
    instance_norm: bool = Field(False, strict=True, description=(
        "InstanceNorm after each 3x3 conv (nnU-Net's; not in the paper)."))
    dropout: float = Field(0.0, ge=0, lt=1, description="Drop-out at the end of the contracting path.")
    up_mode: UpMode = Field("transpose", description="transpose (the paper's 2x2 up-convolution) or bilinear.")
    scale_y: float = Field(1.0, gt=0, le=1, description=(
        "Resample B-scans in depth by this factor before the network (probabilities back after); 1: as they are."))
    scale_x: float = Field(1.0, gt=0, le=1, description=(
        "Resample B-scans in width by this factor before the network (probabilities back after); 1: as they are."))
    deep_supervision: bool = Field(False, strict=True, description=(
        "Also train 1x1 heads on the coarser decoder levels (nnU-Net's; needs --padding same)."))

    @model_validator(mode="after")
    def _one_norm_and_ds_with_same(self) -> UNetConfig:
        if self.batch_norm and self.instance_norm:
            raise ValueError("batch_norm and instance_norm exclude each other")
        if self.deep_supervision and self.padding != "same":
            raise ValueError("deep_supervision needs padding 'same' (valid maps of the decoder levels do not "
                             "align with a down-sampled target)")
        return self


@dataclass(frozen=True, config=_FORBID)
class TrainConfig(_Config):
    """Hyper-parameters of one training run (the network's own live in :class:`UNetConfig`)."""

    epochs: int = Field(20, ge=1, strict=True, description="Training epochs.")
    batch_size: int = Field(4, ge=1, strict=True, description="Tiles per optimisation step.")
    optimizer: Optimizer = Field("sgd", description="sgd (the paper's, with momentum) or adam.")
    lr: float = Field(0.01, gt=0, description="Learning rate.")
    momentum: float = Field(0.99, ge=0, lt=1, description="SGD momentum (the paper: 0.99).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    tile_size: int | None = Field(None, ge=1, strict=True, description=(
        "Input tile (pixels); none: the largest valid tile <= --max-tile whose output fits the B-scan."))
    max_tile: int = Field(MAX_TILE, ge=1, strict=True,
                          description="Largest input tile the tile rule may pick (the paper: 572).")
    wide_tiles: bool = Field(False, strict=True, description=(
        "Training tiles as wide as --max-tile and the B-scan allow, their height by the tile rule: more of each "
        "B-scan's width per tile than square ones (the paper's)."))
    tiles_per_epoch: int = Field(64, ge=1, strict=True, description="Random tiles drawn per epoch.")
    foreground_fraction: float = Field(0.33, ge=0, le=1, description="Share of tiles centred on foreground pixels.")
    dice_weight: float = Field(0.0, ge=0, description=(
        "Weight of a foreground soft-Dice term added to the paper's loss (nnU-Net: 1)."))
    augment: bool = Field(True, strict=True, description="Elastic deformation, flips, grey-value jitter.")
    elastic: bool = Field(True, strict=True, description="With --augment: the paper's elastic deformation.")
    elastic_sigma: Annotated[float, ADDED_LATER] = Field(10.0, ge=0, description=(
        "With --elastic: s.d. in pixels of the network's input of the displacements on the 3 x 3 grid (the "
        "paper: 10 on 572-pixel tiles; on B-scans seen at reduced size each pixel is several of the scan's)."))
    rotation: float = Field(0.0, ge=0, le=180, description="With --augment: random rotation up to this many degrees.")
    scaling: float = Field(0.0, ge=0, description=(
        "With --augment: random zoom up to 1 + this, in and out alike (0.25: 0.8 to 1.25)."))
    jitter: float = Field(0.1, ge=0, lt=1, description=(
        "With --augment: range of the brightness, contrast and gamma jitter (0.1: +-10%)."))
    noise: float = Field(0.0, ge=0, description=(
        "With --augment: Gaussian noise up to this standard deviation (normalised units) on 15% of the tiles."))
    blur: float = Field(0.0, ge=0, description=(
        "With --augment: Gaussian blur of sigma 0.5 to this many pixels on 20% of the tiles."))
    lr_schedule: Literal["constant", "poly", "cosine"] = Field("constant", description=(
        "Learning rate over the run's iterations: constant, poly (lr (1 - t)^0.9, nnU-Net's) or cosine."))
    border_weights: bool = Field(True, strict=True, description=(
        "Weigh the cross-entropy by the border-weight maps of preprocess (the paper's w(x)); off: w = 1."))
    patience: int | None = Field(None, ge=1, strict=True,
                                 description="Stop after this many epochs without a better validation Dice.")
    restore_best: bool = Field(True, strict=True, description="End with the weights of the best validated epoch.")
    ema: float = Field(0.0, ge=0, lt=1, description=(
        "Keep an exponential moving average of the weights (and batch-norm statistics) with this decay per "
        "step, validate it and end with it (0: off; 0.99 averages about the last 100 steps)."))
    seed: int = Field(0, ge=0, strict=True, description="Random seed (tiles, split, initialisation).")
    device: Device = Field("auto", description="auto (GPU when present), cpu, cuda or cuda:N.")
    amp: bool = Field(False, strict=True, description="bfloat16 autocast on CUDA.")
    num_workers: Annotated[int | None, Cli("--loader-workers"), SPEED_ONLY] = Field(
        None, ge=0, strict=True, description="Tile-loading worker processes (default: 0 on CPU, up to 4 on a GPU).")
    processes: Annotated[int, Cli("--gpus", "--processes")] = Field(1, ge=1, strict=True, description=(
        "Data-parallel training processes (DistributedDataParallel): one per GPU with NCCL, or CPU processes "
        "with gloo. The batch is split between them."))


@dataclass(frozen=True, config=_FORBID)
class InferenceConfig(_Config):
    """How a trained U-Net is run over B-scans: the overlap-tile strategy of the paper (Fig. 2)."""

    tile_size: int | None = Field(None, ge=1, strict=True, description=(
        "Tile B-scans with this input tile (pixels) instead of whole passes."))
    max_tile: int = Field(MAX_TILE, ge=1, strict=True, description="Largest tile when B-scans must be tiled.")
    overlap: float = Field(0.25, ge=0, lt=1, description="Overlap of neighbouring output tiles (fraction), blended.")
    batch_size: int | None = Field(None, ge=1, strict=True, description=(
        "B-scans (or tiles) per forward pass; none: what the memory budget holds."))
    device: Device = Field("auto", description="auto (GPU when present), cpu, cuda or cuda:N.")
    amp: bool = Field(False, strict=True, description="bfloat16 autocast on CUDA.")
    memory_budget_mb: Annotated[int | None, Cli("--memory-budget", metavar="MIB")] = Field(
        None, ge=1, strict=True, description="Memory for one forward pass, MiB (none: half the free GPU memory, "
                                             "2048 on CPU).")
    whole: Annotated[bool, Cli("--whole/--tiles")] = Field(True, strict=True, description=(
        "A whole B-scan per forward pass when it fits the memory budget (--tiles: always overlap-tiles)."))
    tta: bool | None = Field(None, strict=True, description=(
        "Test-time augmentation: average with the mirrored B-scan (none: as the model was chosen; a "
        "cross-validation ensemble with it)."))
    compile: bool = Field(False, strict=True, description="torch.compile the network (GPU; slow first batch).")


@dataclass(frozen=True, config=_FORBID)
class PostprocessConfig(_Config):
    """What is done to predicted labels before they are stored; chosen on out-of-fold predictions and
    saved with the model (:mod:`octseg.unet.postprocess`)."""

    min_size: int = Field(0, ge=0, strict=True, description=(
        "Foreground components (per B-scan) smaller than this many pixels become background; 0: none."))


@dataclass(frozen=True, config=_FORBID)
class WeightMapConfig(_Config):
    """w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2), eq. 2 of the paper (w0 = 10, sigma = 5 px)."""

    w0: float = Field(10.0, ge=0, description="Border weight w0 of the paper.")
    sigma: float = Field(5.0, gt=0, description="Border weight sigma (pixels).")
    class_weights: Annotated[Literal["balanced"] | None,
                             Cli("--balanced/--no-balanced", flag_value="balanced", show_default=False)] = Field(
        None, description="Class weights w_c by inverse class frequency (the paper's w_c); default w_c = 1.")
