"""Hyper-parameters of the U-Net (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597) in one frozen dataclass.

The config is saved with every trained model so that inference rebuilds exactly the same network
(``UNet.from_config(UNetConfig.from_dict(saved))``) instead of re-typing its arguments.
The defaults are the paper's network; every departure from the paper is a flag that defaults to off.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["PADDINGS", "UP_MODES", "UNetConfig"]

PADDINGS: tuple[str, ...] = ("valid", "same")
UP_MODES: tuple[str, ...] = ("transpose", "bilinear")


def _check_int(name: str, value: Any, minimum: int) -> None:
    """Raise TypeError/ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's architecture; defaults reproduce the paper's network (31,030,658 parameters)."""

    in_channels: int = 1  # channels of the input image (1 for grey-value OCT B-scans)
    out_channels: int = 2  # number of classes; the network outputs one logit map per class
    base_channels: int = 64  # feature maps after the first double conv; doubled at each pooling
    depth: int = 4  # number of 2x2 max-poolings (4 in the paper: 64 -> 1024 channels)
    padding: str = "valid"  # "valid": unpadded 3x3 convs as in the paper; "same": zero-padded
    batch_norm: bool = False  # departure: BatchNorm after each 3x3 conv (not in the paper)
    dropout: float = 0.0  # drop-out probability at the end of the contracting path (paper: > 0)
    up_mode: str = "transpose"  # "transpose": 2x2 up-convolution as in the paper; "bilinear"

    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, 1)
        _check_int("out_channels", self.out_channels, 1)
        _check_int("base_channels", self.base_channels, 1)
        _check_int("depth", self.depth, 1)
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.up_mode not in UP_MODES:
            raise ValueError(f"up_mode must be one of {UP_MODES}, got {self.up_mode!r}")
        if not isinstance(self.batch_norm, bool):
            raise TypeError(
                f"batch_norm must be a bool, got {type(self.batch_norm).__name__} ({self.batch_norm!r})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(
                f"dropout must be a float, got {type(self.dropout).__name__} ({self.dropout!r})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "dropout", float(self.dropout))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields, e.g. to store beside the weights."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Rebuild a config from ``to_dict()`` output.

        Unknown keys raise ValueError (nothing is ignored silently); missing keys take the defaults
        above, so a dict written by ``to_dict()`` always round-trips exactly.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))
