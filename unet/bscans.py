"""Annotated B-scans held in memory for training and validation (NumPy only: no torch here)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BScanSet"]


@dataclass
class BScanSet:
    """Annotated B-scans in memory: images float32 (N, H, W), labels int64 (N, H, W), weights (N, H, W)."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.labels.shape != self.images.shape:
            raise ValueError(
                f"images and labels must both be (N, H, W); got {self.images.shape} and {self.labels.shape}"
            )
        if self.weights is not None and self.weights.shape != self.images.shape:
            raise ValueError(f"weights shape {self.weights.shape} != images shape {self.images.shape}")

    def __len__(self) -> int:
        return len(self.images)
