"""Resampling B-scans for a network that sees them smaller (``UNetConfig.scale_y``/``scale_x``).

A network trained on B-scans resampled by (sy, sx) predicts on B-scans resampled the same way, and its
class probabilities are resampled back to the B-scan's own size before the arg-max, so labels always
have the shape of the image they belong to. Images shrink with an anti-aliased (area-like) bilinear
filter; probabilities grow back bilinearly; labels shrink by the class that covers most of each new
pixel (never by picking one source pixel, which would drop thin structures at random).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from octseg.unet.bscans import BScanSet
from octseg.unet.config import UNetConfig

__all__ = ["is_resampled", "resample_images", "resample_labels", "resample_probabilities", "resample_set",
           "scaled_size"]


def is_resampled(config: UNetConfig) -> bool:
    return config.scale_y != 1.0 or config.scale_x != 1.0


def scaled_size(config: UNetConfig, hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) the network sees for a B-scan of ``hw`` pixels: each side scaled and rounded, at least 1."""
    return max(1, round(hw[0] * config.scale_y)), max(1, round(hw[1] * config.scale_x))


def resample_images(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """float32 (N, H, W) or (N, C, H, W) -> the same at ``hw``, anti-aliased bilinear."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    squeeze = x.ndim == 3
    x = x[:, None] if squeeze else x
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    out = x.numpy()
    return out[:, 0] if squeeze else out


def resample_probabilities(probs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """float32 (N, K, h, w) -> (N, K, H, W) at ``hw``, bilinear (still summing to 1 per pixel)."""
    if tuple(probs.shape[-2:]) == tuple(hw):
        return probs
    x = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False).numpy()


def resample_labels(labels: np.ndarray, hw: tuple[int, int], classes: int) -> np.ndarray:
    """Integer (N, H, W) -> (N, h, w): each new pixel the class covering most of it.

    Negative labels (unannotated pixels, ignored by the losses) are one more "class": a new pixel mostly
    unannotated stays unannotated, with the first negative value found.
    """
    unannotated = labels < 0
    planes = [labels == k for k in range(classes)]
    if unannotated.any():
        planes.append(unannotated)
    out = resample_images(np.stack(planes, axis=1).astype(np.float32), hw).argmax(1).astype(labels.dtype)
    if len(planes) > classes:
        out[out == classes] = labels[unannotated].flat[0]
    return out


def resample_set(data: BScanSet, config: UNetConfig) -> BScanSet:
    """Training B-scans as the network sees them (a no-op for scale 1)."""
    if not is_resampled(config):
        return data
    hw = scaled_size(config, data.images.shape[1:])
    classes = max(config.out_channels, int(data.labels.max(initial=0)) + 1)
    weights = None if data.weights is None else resample_images(data.weights, hw)
    return BScanSet(resample_images(data.images, hw), resample_labels(data.labels, hw, classes), weights)
