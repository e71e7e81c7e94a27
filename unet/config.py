"""Every setting of the U-Net, its training, its inference and its weight maps, each defined once.

Four frozen dataclasses hold the defaults and check their values where they are built; everything
else (the flows' pydantic configs, the ``octseg`` command, Prefect deployments) nests these objects
instead of re-typing their fields. :class:`UNetConfig` is saved with every trained model so that
inference rebuilds exactly the same network (``UNet.from_config(UNetConfig.from_dict(saved))``).
The defaults are the paper's (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597); every departure
from it is a flag that defaults to off.

This module imports nothing beyond the standard library, so the command line can read the defaults
without paying for torch.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping, get_args

__all__ = [
    "MAX_TILE",
    "PADDINGS",
    "UP_MODES",
    "InferenceConfig",
    "TrainConfig",
    "UNetConfig",
    "WeightMapConfig",
]

Padding = Literal["valid", "same"]
UpMode = Literal["transpose", "bilinear"]
Optimizer = Literal["sgd", "adam"]
PADDINGS: tuple[str, ...] = get_args(Padding)
UP_MODES: tuple[str, ...] = get_args(UpMode)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)

MAX_TILE = 572
"""Largest network input tile (pixels per side) for training and inference: the paper's 572x572."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    """Raise TypeError/ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False,
                  hi_open: bool = True) -> float:
    """``value`` as a float within [lo, hi) (bounds as flagged); TypeError/ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    too_low = value <= lo if lo_open else value < lo
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high or value != value:  # NaN fails every comparison
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo:g}, {'inf' if hi is None else f'{hi:g}'}{right}, got {value}")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


class _Config:
    """``to_dict``/``from_dict`` shared by the configs below (unknown keys are an error, never ignored)."""

    # read by pydantic when a flow config nests these dataclasses: unknown keys fail there too
    __pydantic_config__ = {"extra": "forbid"}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields, e.g. to store beside the weights."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Rebuild a config from ``to_dict()`` output; missing keys take the defaults."""
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class UNetConfig(_Config):
    """The U-Net's architecture; defaults reproduce the paper's network (31,030,658 parameters)."""

    in_channels: int = 1  # channels of the input image (1 for grey-value OCT B-scans)
    out_channels: int = 2  # number of classes; the network outputs one logit map per class
    base_channels: int = 64  # feature maps after the first double conv; doubled at each pooling
    depth: int = 4  # number of 2x2 max-poolings (4 in the paper: 64 -> 1024 channels)
    padding: Padding = "valid"  # "valid": unpadded 3x3 convs as in the paper; "same": zero-padded
    batch_norm: bool = False  # departure: BatchNorm after each 3x3 conv (not in the paper)
    dropout: float = 0.0  # drop-out probability at the end of the contracting path (paper: > 0)
    up_mode: UpMode = "transpose"  # "transpose": 2x2 up-convolution as in the paper; "bilinear"

    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, 1)
        _check_int("out_channels", self.out_channels, 2)  # background + at least one class
        _check_int("base_channels", self.base_channels, 1)
        _check_int("depth", self.depth, 1)
        _check_choice("padding", self.padding, PADDINGS)
        _check_choice("up_mode", self.up_mode, UP_MODES)
        _check_bool("batch_norm", self.batch_norm)
        object.__setattr__(self, "dropout", _check_number("dropout", self.dropout, 0.0, 1.0))


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Hyper-parameters of one training run (the network's own live in :class:`UNetConfig`)."""

    epochs: int = 20
    batch_size: int = 4  # tiles per optimisation step
    optimizer: Optimizer = "sgd"  # "sgd" (the paper's, with momentum 0.99) or "adam"
    lr: float = 0.01
    momentum: float = 0.99  # SGD only
    weight_decay: float = 0.0
    tile_size: int | None = None  # network input tile; None: octseg.unet.model.choose_tile_size
    max_tile: int = MAX_TILE  # largest input tile that rule may pick: the paper's 572 -> 388 tile
    tiles_per_epoch: int = 64
    foreground_fraction: float = 0.33  # tiles centred near a foreground pixel (class imbalance)
    dice_weight: float = 0.0  # departure: + this x soft Dice of the foreground classes (nnU-Net: 1); paper: 0
    augment: bool = True  # the paper's elastic deformation, flips and grey-value jitter
    patience: int | None = None  # stop after this many epochs without a better validation Dice; None: never
    restore_best: bool = True  # end with the weights of the epoch with the best validation Dice
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present) or a torch device: "cpu", "cuda:1", ...
    amp: bool = False  # bfloat16 autocast on CUDA
    num_workers: int | None = None  # tile-loading processes; None: 0 on CPU (cores train), up to 4 on CUDA
    processes: int = 1  # data-parallel training processes (DDP): one per GPU (nccl), or CPU processes (gloo)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "tiles_per_epoch"):
            _check_int(name, getattr(self, name), 1)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        object.__setattr__(self, "lr", _check_number("lr", self.lr, 0.0, None, lo_open=True))
        object.__setattr__(self, "momentum", _check_number("momentum", self.momentum, 0.0, 1.0))
        object.__setattr__(self, "weight_decay", _check_number("weight_decay", self.weight_decay, 0.0))
        if self.tile_size is not None:
            _check_int("tile_size", self.tile_size, 1)
        _check_int("max_tile", self.max_tile, 1)
        object.__setattr__(self, "dice_weight", _check_number("dice_weight", self.dice_weight, 0.0))
        object.__setattr__(self, "foreground_fraction",
                           _check_number("foreground_fraction", self.foreground_fraction, 0.0, 1.0, hi_open=False))
        _check_bool("augment", self.augment)
        if self.patience is not None:
            _check_int("patience", self.patience, 1)
        _check_bool("restore_best", self.restore_best)
        _check_int("seed", self.seed, 0)
        _check_device(self.device)
        _check_bool("amp", self.amp)
        if self.num_workers is not None:
            _check_int("num_workers", self.num_workers, 0)
        _check_int("processes", self.processes, 1)


@dataclass(frozen=True)
class InferenceConfig(_Config):
    """How a trained U-Net is run over B-scans: the overlap-tile strategy of the paper (Fig. 2)."""

    tile_size: int | None = None  # network input tile; None: octseg.unet.model.choose_tile_size
    max_tile: int = MAX_TILE  # largest input tile that rule may pick
    overlap: float = 0.25  # fraction of an output tile shared with its neighbour, blended
    batch_size: int | None = None  # B-scans (or tiles) per forward pass; None: what the memory budget holds
    device: str = "auto"  # "auto" (CUDA when present) | "cpu" | "cuda" | "cuda:N"
    amp: bool = False  # bfloat16 autocast on CUDA
    memory_budget_mb: int | None = None  # for one forward pass; None: half the free GPU memory, or 2048 on CPU
    whole: bool = True  # a whole B-scan per pass when it fits the budget; False: always tiles
    tta: bool = False  # test-time augmentation: mean of the B-scan's and its left-right mirror's probabilities
    compile: bool = False  # torch.compile the network (CUDA; slow first batch)

    def __post_init__(self) -> None:
        if self.tile_size is not None:
            _check_int("tile_size", self.tile_size, 1)
        _check_int("max_tile", self.max_tile, 1)
        object.__setattr__(self, "overlap", _check_number("overlap", self.overlap, 0.0, 1.0))
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        _check_device(self.device)
        for name in ("amp", "whole", "tta", "compile"):
            _check_bool(name, getattr(self, name))
        if self.memory_budget_mb is not None:
            _check_int("memory_budget_mb", self.memory_budget_mb, 1)


@dataclass(frozen=True)
class WeightMapConfig(_Config):
    """w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2), eq. 2 of the paper (w0 = 10, sigma = 5 px)."""

    w0: float = 10.0  # amplitude of the border term
    sigma: float = 5.0  # width of the border term, pixels
    class_weights: Literal["balanced"] | None = None  # None: w_c = 1; "balanced": inverse class frequency

    def __post_init__(self) -> None:
        object.__setattr__(self, "w0", _check_number("w0", self.w0, 0.0))
        object.__setattr__(self, "sigma", _check_number("sigma", self.sigma, 0.0, None, lo_open=True))
        if self.class_weights is not None:
            _check_choice("class_weights", self.class_weights, ("balanced",))


_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _check_device(device: Any) -> None:
    """"auto" or a torch device ("cpu", "cuda", "cuda:N", "mps", "xpu"); whether it is there is checked
    when a model is moved to it."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu', got {device!r}")
