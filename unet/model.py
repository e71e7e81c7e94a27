"""The U-Net of Ronneberger, Fischer, Brox 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (arXiv 1505.04597), wired from the blocks in ``octseg.unet.parts``.

With the defaults this is the paper's network (Fig. 1): unpadded 3x3 convs + ReLU, 64 -> 1024 channels
over 4 max-poolings, 23 conv layers, 31,030,658 parameters for 2 classes, and a 572x572 input tile
gives a 388x388 output map. Because unpadded convs shrink the maps, only some input sizes are valid
(every pooled map must be even); ``output_size`` and friends compute them, and ``forward`` refuses
other sizes with a ValueError naming the nearest valid ones.
"""
from __future__ import annotations

import logging
import math
import numbers

import torch
from torch import nn

from octseg.unet.config import PADDINGS, PostprocessConfig, UNetConfig
from octseg.unet.parts import DoubleConv, Down, OutConv, Up

__all__ = ["UNet", "Unet", "choose_tile_size", "output_size", "valid_input_sizes", "nearest_valid_input_size"]

logger = logging.getLogger(__name__)


def _trace_size(n: int, depth: int, padding: str) -> tuple[int | None, str]:
    """Follow an input size n through the network: (output size, "") or (None, why it is invalid)."""
    shrink = 4 if padding == "valid" else 0  # two 3x3 convs per level, 1 pixel lost per side each
    s = n
    for level in range(1, depth + 1):
        s -= shrink
        if s <= 0:
            return None, f"the maps shrink to {s} before max-pool {level}"
        if s % 2:
            return None, f"max-pool {level} would see an odd size ({s})"
        s //= 2
    s -= shrink
    if s <= 0:
        return None, f"the bottleneck shrinks to {s}"
    for level in range(1, depth + 1):
        s = 2 * s - shrink
        if s <= 0:
            return None, f"the maps shrink to {s} after up-conv {level}"
    return s, ""


def _check_args(n: int, depth: int, padding: str) -> tuple[int, int]:
    """Type/range checks shared by the size functions; returns (n, depth) as plain ints."""
    for name, value in (("n", n), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return int(n), int(depth)


def nearest_valid_input_size(n: int, depth: int = 4, padding: str = "valid") -> tuple[int | None, int]:
    """(largest valid size <= n or None if there is none, smallest valid size >= n); (n, n) if n is valid."""
    n, depth = _check_args(n, depth, padding)
    below = next((m for m in range(n, 0, -1) if _trace_size(m, depth, padding)[0] is not None), None)
    # Valid sizes repeat with period 2**depth from a minimum below 2**(depth + 4), so this search is short.
    start = max(n, 1)
    above = next(
        m for m in range(start, start + 2 ** (depth + 4)) if _trace_size(m, depth, padding)[0] is not None
    )
    return below, above


def output_size(n: int, depth: int = 4, padding: str = "valid") -> int:
    """Output size along one axis for input size n (e.g. 572 -> 388 for the paper's network).

    Raises ValueError naming the nearest valid input sizes when a pooled map would be odd or a map
    shrinks to <= 0 pixels.
    """
    n, depth = _check_args(n, depth, padding)
    out, why = _trace_size(n, depth, padding)
    if out is None:
        below, above = nearest_valid_input_size(n, depth, padding)
        raise ValueError(
            f"input size {n} is invalid for a U-Net with depth={depth}, padding={padding!r}: {why}; "
            f"nearest valid input sizes: {below if below is not None else 'none'} below, {above} above"
        )
    return out


def valid_input_sizes(lo: int, hi: int, depth: int = 4, padding: str = "valid") -> list[int]:
    """All valid input sizes n with lo <= n <= hi, ascending."""
    lo, depth = _check_args(lo, depth, padding)
    hi, depth = _check_args(hi, depth, padding)
    return [n for n in range(max(lo, 1), hi + 1) if _trace_size(n, depth, padding)[0] is not None]


def choose_tile_size(config: UNetConfig, image_hw: tuple[int, int], max_input: int) -> int:
    """The square input tile that training and inference both use for B-scans of ``image_hw``.

    The largest valid input <= ``max_input`` whose output fits inside the image (so a training tile
    carries labels on every output pixel, and inference covers the image with as few tiles as
    possible); when even the smallest output is larger than the image, the smallest valid input
    (inference mirror-pads the image to fit it, training refuses it); a ``max_input`` below the
    smallest valid input is a ValueError.

    >>> choose_tile_size(UNetConfig(), (496, 768), 572)  # the paper's tile for a Duke B-scan
    572
    >>> choose_tile_size(UNetConfig(depth=2), (64, 96), 572)  # output 64 = the shorter side
    104
    """
    depth, padding, limit = config.depth, config.padding, min(image_hw)
    smallest = nearest_valid_input_size(1, depth, padding)[1]
    if max_input < smallest:
        raise ValueError(f"max tile {max_input} is below the smallest valid input ({smallest}) of a U-Net with "
                         f"depth={depth}, padding={padding!r}")
    best = None
    for n in range(max(max_input, 1), 0, -1):
        out = _trace_size(n, depth, padding)[0]
        if out is not None and out <= limit:
            best = n
            break
    return best if best is not None else smallest


def _init_weights(module: nn.Module) -> None:
    """He-normal init (std sqrt(2/N), N = incoming nodes of one neuron, as in the paper) and zero biases."""
    if isinstance(module, nn.ConvTranspose2d):
        # Each output pixel of a 2x2 stride-2 up-conv sees in_channels inputs (kernels do not overlap);
        # torch's fan_in for a transposed weight (C_in, C_out, k, k) would be C_out*k*k instead.
        kh, kw = module.kernel_size
        sh, sw = module.stride
        fan_in = module.in_channels * max(kh // sh, 1) * max(kw // sw, 1)
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class UNet(nn.Module):
    """U-Net: (N, in_channels, H, W) -> logits (N, out_channels, h, w); h = output_size(H) (388 for 572)."""

    def __init__(self, config: UNetConfig | None = None, **fields) -> None:
        """Build from a config, or from its fields as keywords: ``UNet(base_channels=16)``."""
        super().__init__()
        if config is None:
            config = UNetConfig(**fields)
        elif fields:
            raise TypeError(f"give a UNetConfig or its fields, not both (got {sorted(fields)})")
        elif not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        self.postprocess = PostprocessConfig()  # applied to its labels by octseg.unet.inference; saved with it
        in_channels, out_channels, base_channels, depth = (
            config.in_channels, config.out_channels, config.base_channels, config.depth)
        padding, dropout, up_mode = config.padding, config.dropout, config.up_mode
        batch_norm = "batch" if config.batch_norm else "instance" if config.instance_norm else None
        ch = [base_channels * 2**i for i in range(depth + 1)]  # 64, 128, 256, 512, 1024
        self.inc = DoubleConv(in_channels, ch[0], padding, batch_norm)
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1], padding, batch_norm) for i in range(depth))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(
            Up(ch[i + 1], ch[i], padding, batch_norm, up_mode) for i in reversed(range(depth))
        )
        self.outc = OutConv(ch[0], out_channels)
        # deep supervision: a 1x1 head on each decoder level but the finest (outc), coarse to fine
        levels = reversed(range(1, depth)) if config.deep_supervision else ()
        self.heads = nn.ModuleList(OutConv(ch[i], out_channels) for i in levels)
        self.apply(_init_weights)
        logger.debug("built UNet %s with %d parameters", self.config, self.num_parameters())

    @classmethod
    def from_config(cls, cfg: UNetConfig) -> UNet:
        """Rebuild the network described by a (saved) UNetConfig."""
        return cls(cfg)

    def num_parameters(self) -> int:
        """Number of trainable scalars (31,030,658 for the paper's 2-class network)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def output_size(self, n: int) -> int:
        """Output size along one axis for input size n; ValueError naming the nearest valid sizes."""
        return output_size(n, self.config.depth, self.config.padding)

    def valid_input_sizes(self, lo: int, hi: int) -> list[int]:
        """All valid input sizes n with lo <= n <= hi."""
        return valid_input_sizes(lo, hi, self.config.depth, self.config.padding)

    def nearest_valid_input_size(self, n: int) -> tuple[int | None, int]:
        """(largest valid size <= n or None, smallest valid size >= n)."""
        return nearest_valid_input_size(n, self.config.depth, self.config.padding)

    def _check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is (N, in_channels, H, W) with valid H and W."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        for axis, n in (("height", x.shape[2]), ("width", x.shape[3])):
            try:
                self.output_size(int(n))
            except ValueError as e:
                raise ValueError(f"input {axis}: {e}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(N, C_in, H, W) -> logits (N, C_out, h, w); shapes below are the paper's 572x572 tile.

        With ``deep_supervision``, in training mode: the list [full, 1/2, 1/4, ...] of logits of the
        decoder levels, finest first (``octseg.unet.losses.deep_supervision_loss`` takes it)."""
        self._check_input(x)
        skips = []
        x = self.inc(x)  # (N, 64, 568, 568)
        for down in self.downs:  # max-pool + 2 convs: 568 -> 280 -> 136 -> 64 -> 28
            skips.append(x)
            x = down(x)  # last: bottleneck (N, 1024, 28, 28)
        x = self.dropout(x)  # drop-out at the end of the contracting path
        coarse = []
        for i, (up, skip) in enumerate(zip(self.ups, reversed(skips))):  # up-conv, crop+concat, 2 convs
            x = up(x, skip)  # 28 -> 52 -> 100 -> 196 -> 388
            if self.training and i < len(self.heads):
                coarse.append(self.heads[i](x))
        logits = self.outc(x)  # (N, out_channels, 388, 388)
        return [logits, *reversed(coarse)] if coarse else logits


def Unet(in_channel: int = 1, out_channel: int = 2, **fields) -> UNet:  # noqa: N802 - the seed article's spelling
    """Alias for the seed article's call ``Unet(in_channel=1, out_channel=2)``; returns the same UNet."""
    return UNet(UNetConfig(in_channels=in_channel, out_channels=out_channel, **fields))
