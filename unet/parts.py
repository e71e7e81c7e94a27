"""Building blocks of the U-Net (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597, Fig. 1).

Each block is one arrow type of the paper's figure:
blue arrows (3x3 conv + ReLU, twice) -> ``DoubleConv``; red (2x2 max pool) -> ``Down``;
green (2x2 up-conv), grey (copy and crop) -> ``Up``; teal (1x1 conv) -> ``OutConv``.
With ``padding="valid"`` (the paper) every 3x3 conv shrinks a map by 2 pixels per axis, which is
why the skip connection must be center-cropped before concatenation.
"""
from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch
from torch import nn

from octseg.unet.config import Padding, UpMode

__all__ = ["DoubleConv", "Down", "Up", "OutConv", "center_crop"]

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


def center_crop(t: ArrayT, size: int | tuple[int, int] | torch.Size) -> ArrayT:
    """Center-crop the last two axes of ``t`` (..., H, W) to ``size`` = (h, w) (an int means h = w).

    Works for torch tensors and numpy arrays of any leading shape, e.g. feature maps (N, C, H, W),
    targets and weight maps (N, H, W) or single images (H, W). When H - h is odd the extra pixel is
    dropped at the bottom/right. Returns a view (no copy).
    """
    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if t.ndim < 2:
        raise ValueError(f"center_crop expects an array with >= 2 axes (..., H, W), got shape {tuple(t.shape)}")
    big_h, big_w = int(t.shape[-2]), int(t.shape[-1])
    if not (0 < h <= big_h and 0 < w <= big_w):
        raise ValueError(
            f"center_crop size must satisfy 0 < (h, w) <= (H, W) = {(big_h, big_w)}, got {(h, w)}"
        )
    top, left = (big_h - h) // 2, (big_w - w) // 2
    return t[..., top : top + h, left : left + w]


Norm = Literal["batch", "instance"] | None


class DoubleConv(nn.Sequential):
    """(3x3 conv [+ norm] -> ReLU) x 2; "valid" shrinks H, W by 4, "same" keeps them. ``batch_norm``: True or
    "batch" for BatchNorm, "instance" for InstanceNorm (affine, as nnU-Net's), False/None for none."""

    def __init__(self, in_channels: int, out_channels: int, padding: Padding = "valid",
                 batch_norm: bool | Norm = False):
        pad = 0 if padding == "valid" else 1
        norm = "batch" if batch_norm is True else (batch_norm or None)
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(c_in, out_channels, kernel_size=3, padding=pad, bias=norm is None))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out_channels))
            elif norm == "instance":
                layers.append(nn.InstanceNorm2d(out_channels, affine=True))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool (stride 2) -> DoubleConv: (N, C_in, H, W) -> (N, C_out, H/2 - 4, W/2 - 4) if valid."""

    def __init__(self, in_channels: int, out_channels: int, padding: Padding = "valid", batch_norm: bool | Norm = False):
        super().__init__(
            nn.MaxPool2d(kernel_size=2, stride=2),
            DoubleConv(in_channels, out_channels, padding, batch_norm),
        )


class Up(nn.Module):
    """2x2 up-conv halving channels (or bilinear x2 + 1x1 conv) -> crop skip, concat -> DoubleConv.

    The skip connection must carry ``in_channels // 2`` channels (the contracting path's map at the
    same level), so the concatenation has ``in_channels`` channels again.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: Padding = "valid",
        batch_norm: bool | Norm = False,
        up_mode: UpMode = "transpose",
    ):
        super().__init__()
        half = in_channels // 2
        if up_mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, half, kernel_size=1),
            )
        self.conv = DoubleConv(2 * half, out_channels, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x (N, C, h, w), skip (N, C/2, H, W) with H >= 2h -> (N, C_out, 2h - 4, 2w - 4) if valid."""
        x = self.up(x)  # (N, C/2, 2h, 2w)
        skip = center_crop(skip, x.shape[-2:])  # (N, C/2, 2h, 2w): the paper's "copy and crop"
        return self.conv(torch.cat([skip, x], dim=1))  # concat -> (N, C, 2h, 2w) -> DoubleConv


class OutConv(nn.Conv2d):
    """1x1 conv mapping each feature vector to one logit per class: (N, C, H, W) -> (N, K, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)
