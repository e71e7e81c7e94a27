"""An ensemble of U-Nets of one architecture (e.g. the K models of a cross-validation), used as one network.

``forward`` returns the logarithm of the mean of the members' softmax probabilities, so everything that
takes a U-Net's logits (inference, tiling, test-time flips, the arg-max) gets the ensemble's averaged
probabilities from its own softmax: softmax(log mean p) = mean p, exactly (nnU-Net averages softmax
outputs of its folds the same way). Members run one after another, so peak memory is one member's.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from octseg.unet.config import PostprocessConfig, UNetConfig
from octseg.unet.model import UNet

__all__ = ["UNetEnsemble"]


class UNetEnsemble(nn.Module):
    """Members sharing one :class:`UNetConfig`; behaves as a U-Net with that config for inference."""

    def __init__(self, members: Sequence[UNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        configs = {m.config for m in members}
        if len(configs) != 1:
            raise ValueError(f"ensemble members must share one UNetConfig, got {len(configs)} different ones")
        self.members = nn.ModuleList(members)
        self.config: UNetConfig = members[0].config
        self.postprocess = PostprocessConfig()  # chosen for the ensemble on out-of-fold predictions

    @classmethod
    def from_state_dicts(cls, config: UNetConfig, states: Sequence[dict[str, torch.Tensor]]) -> UNetEnsemble:
        members = []
        for state in states:
            member = UNet.from_config(config)
            member.load_state_dict(state)
            members.append(member.eval())
        return cls(members)

    def output_size(self, n: int) -> int:
        return self.members[0].output_size(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log of the mean class probabilities (N, K, h, w) over the members."""
        mean = sum(torch.softmax(m(x).float(), dim=1) for m in self.members) / len(self.members)
        return torch.log(mean.clamp_min(1e-12))
