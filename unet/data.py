"""Training tiles for a valid-padding U-Net (Ronneberger et al. 2015, arXiv 1505.04597, sec. 3).

A tile is an input window of the mirror-padded image and the output window it predicts: the label
and weight crops are ``halo = (input - output) / 2`` smaller on every side, so the network sees the
context it needs for every labelled pixel (the paper's overlap-tile strategy, applied to training).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from octseg.unet.augment import augment as augment_tile
from octseg.unet.bscans import BScanSet

__all__ = ["BScanSet", "EpochSampler", "TileDataset"]

class TileDataset(Dataset):
    """Random (input tile, label crop, weight crop) samples from a :class:`BScanSet`.

    Item ``i`` of epoch ``e`` is drawn from a generator seeded with ``(seed, e, i)``, so runs repeat,
    whichever process draws it. Index ``e * n_tiles + i`` is that item too (added to :meth:`set_epoch`'s
    epoch), so :class:`EpochSampler` can name epochs to persistent DataLoader workers.
    A fraction ``foreground`` of the tiles is centred near a random foreground pixel (label > 0), the
    rest anywhere: small structures such as fluid pockets are otherwise rarely seen (nnU-Net samples
    a third of its patches this way).
    With ``augment``, each tile is augmented by :func:`octseg.unet.augment.augment` with the keywords
    ``augmentation`` (the paper's when empty).
    ``tile`` and ``output`` are square sizes or (height, width) pairs.
    Returns ``image`` float32 (1, Th, Tw), ``target`` int64 (Oh, Ow), ``weight`` float32 (Oh, Ow).
    """

    def __init__(self, data: BScanSet, tile: int | tuple[int, int], output: int | tuple[int, int], n_tiles: int,
                 augment: bool = True, seed: int = 0, foreground: float = 0.0,
                 augmentation: Mapping[str, Any] | None = None):
        tile, output = _pair(tile), _pair(output)
        if any(o > n for o, n in zip(output, data.images.shape[1:])):
            raise ValueError(f"output tile {output} does not fit B-scans of {data.images.shape[1:]}")
        if any((t - o) % 2 for t, o in zip(tile, output)):
            raise ValueError(f"input tile {tile} and output {output} differ by an odd number of pixels")
        self.data, self.tile, self.output, self.n_tiles = data, tile, output, n_tiles
        self.halo = ((tile[0] - output[0]) // 2, (tile[1] - output[1]) // 2)
        if not 0.0 <= foreground <= 1.0:
            raise ValueError(f"foreground must be in [0, 1], got {foreground}")
        self.augment, self.seed, self.epoch, self.foreground = augment, seed, 0, foreground
        self.augmentation = dict(augmentation or {})  # keywords of octseg.unet.augment.augment
        self._fg = np.argwhere(data.labels > 0)  # (M, 3) k, y, x of foreground pixels
        pad = ((0, 0), (self.halo[0], self.halo[0]), (self.halo[1], self.halo[1]))
        # the same mirror as inference (octseg.unet.tiling.mirror_pad): reflect, the edge pixel not repeated
        self._images = np.pad(data.images, pad, mode="reflect")
        small = np.uint8 if data.labels.size == 0 or (data.labels.min() >= 0 and data.labels.max() < 256) else np.int32
        self._labels = np.pad(data.labels.astype(small), pad, mode="reflect")  # a quarter of the int64's memory
        w = data.weights if data.weights is not None else np.ones_like(data.images, dtype=np.float32)
        self._weights = np.pad(w.astype(np.float32), pad, mode="reflect")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_tiles

    def _origin(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """B-scan index and top-left corner of the output window (in unpadded coordinates)."""
        n, h, w = self.data.images.shape
        oh, ow = self.output
        if len(self._fg) and rng.random() < self.foreground:
            k, cy, cx = self._fg[rng.integers(len(self._fg))]
            y = int(np.clip(cy - rng.integers(oh), 0, h - oh))
            x = int(np.clip(cx - rng.integers(ow), 0, w - ow))
            return int(k), y, x
        return int(rng.integers(n)), int(rng.integers(h - oh + 1)), int(rng.integers(w - ow + 1))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(int(index), self.n_tiles)
        rng = np.random.default_rng((self.seed, self.epoch + epoch, i))
        k, y, x = self._origin(rng)
        (th, tw), (oh, ow), (hy, hx) = self.tile, self.output, self.halo
        window = np.s_[k, y : y + th, x : x + tw]  # padded coordinates
        image, labels, weights = self._images[window], self._labels[window], self._weights[window]
        c = np.s_[hy : hy + oh, hx : hx + ow]  # what the loss sees
        if self.augment:
            image, labels, weights = augment_tile(image, labels, weights, rng, window=c, **self.augmentation)
        else:
            labels, weights = labels[c], weights[c]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),
            "target": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "weight": torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
        }


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


class EpochSampler(Sampler[int]):
    """Indices ``epoch * n_tiles + i`` of the current epoch's tiles, in order; with ``world`` processes
    (DistributedDataParallel), process ``rank`` takes the tiles i = rank, rank + world, ..., so batch b of
    every process together holds the tiles of batch b of a single process with a ``world`` x larger batch."""

    def __init__(self, n_tiles: int, rank: int = 0, world: int = 1) -> None:
        self.n_tiles, self.rank, self.world, self.epoch = n_tiles, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.n_tiles, self.world))

    def __iter__(self):
        return iter(range(self.epoch * self.n_tiles + self.rank, (self.epoch + 1) * self.n_tiles, self.world))
