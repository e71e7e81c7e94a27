"""Losses for the U-Net (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597, Sec. 3).

The paper's energy is a pixel-wise soft-max over the final feature map combined with a weighted
cross entropy, E = sum_x w(x) log p_{l(x)}(x), where the weight map w balances class frequencies and
emphasises the borders between touching objects. Because the network is unpadded, its output is
smaller than its input; targets and weight maps must be center-cropped to the logits with
``center_crop`` before they reach the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from octseg.unet.parts import center_crop

__all__ = ["weighted_cross_entropy", "soft_dice_loss", "center_crop"]


def _check_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Validate logits (N, C, h, w) against target (N, h, w); return the mask of non-ignored pixels."""
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (N, C, H, W), got {tuple(logits.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of class indices, got dtype {target.dtype}")
    n, c, h, w = logits.shape
    if target.ndim != 3 or target.shape[0] != n:
        raise ValueError(f"target must have shape (N, H, W) = ({n}, {h}, {w}), got {tuple(target.shape)}")
    if tuple(target.shape[1:]) != (h, w):
        hint = ""
        if target.shape[1] >= h and target.shape[2] >= w:
            hint = f"; the unpadded U-Net's output is smaller than its input: use center_crop(target, {(h, w)})"
        raise ValueError(f"target spatial size {tuple(target.shape[1:])} != logits spatial size {(h, w)}{hint}")
    valid = target != ignore_index
    if bool(((target < 0) | (target >= c))[valid].any()):
        raise ValueError(f"target holds class indices outside [0, {c}) that are not ignore_index={ignore_index}")
    return valid


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean over non-ignored pixels x of w(x) * (-log softmax(logits)(x)[target(x)]).

    logits (N, C, H, W) float; target (N, H, W) int64 class indices; weights (N, H, W) float or None
    (w = 1, then this equals ``F.cross_entropy``). Unlike ``F.cross_entropy(weight=...)`` the sum is
    divided by the number of non-ignored pixels, not by the sum of their weights. Returns a scalar;
    0 (still attached to the graph) when every pixel is ignored.
    """
    valid = _check_target(logits, target, ignore_index)
    if weights is not None and tuple(weights.shape) != tuple(target.shape):
        hint = " (use center_crop(weights, logits.shape[-2:]))" if weights.ndim == 3 else ""
        raise ValueError(
            f"weights must have the target's shape {tuple(target.shape)}, got {tuple(weights.shape)}{hint}"
        )
    log_p = F.log_softmax(logits, dim=1)  # (N, C, H, W), stable: no log(softmax)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    nll = -log_p.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # (N, H, W)
    if weights is not None:
        nll = nll * weights.to(nll.dtype)
    nll = torch.where(valid, nll, torch.zeros_like(nll))  # ignored pixels contribute exactly 0
    return nll.sum() / valid.sum().clamp(min=1)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 1.0,
    ignore_index: int = -100,
    include_background: bool = True,
) -> torch.Tensor:
    """1 - mean over classes k of (2 sum p_k g_k + eps) / (sum p_k + sum g_k + eps), pooled over the batch.

    logits (N, C, H, W); target (N, H, W) int64; p = softmax(logits), g = one-hot(target); ignored pixels
    count for neither. ``include_background=False`` averages over classes 1.. only (nnU-Net's choice for
    rare foreground). Not in the paper (an optional addition); ~0 for perfect confident logits.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    valid = _check_target(logits, target, ignore_index)
    c = logits.shape[1]
    mask = valid.unsqueeze(1).to(logits.dtype)  # (N, 1, H, W)
    probs = F.softmax(logits, dim=1) * mask  # (N, C, H, W)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    onehot = F.one_hot(safe_target, c).permute(0, 3, 1, 2).to(logits.dtype) * mask  # (N, C, H, W)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)  # (C,)
    dice = (2 * inter + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)  # (C,)
    return 1.0 - (dice if include_background else dice[1:]).mean()
