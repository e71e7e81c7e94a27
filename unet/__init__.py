"""The U-Net of Ronneberger, Fischer and Brox 2015 (arXiv 1505.04597) for OCT segmentation.

Pure PyTorch / NumPy / SciPy / scikit-image: this package never imports prefect, mlflow, zarr or dask.

- :class:`UNet` (alias :func:`Unet`) and :class:`UNetConfig`: the network, the paper's by default;
- :class:`TrainConfig`, :class:`InferenceConfig`, :class:`WeightMapConfig`: every other setting, once;
- :func:`border_weight_map`: w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2);
- :func:`weighted_cross_entropy`, :func:`soft_dice_loss`, :func:`center_crop`;
- :func:`predict_tiled`: the overlap-tile strategy for images of any size;
- :mod:`octseg.unet.augment`, :mod:`octseg.unet.metrics`, :mod:`octseg.unet.train`,
  :mod:`octseg.unet.inference`.

Names are imported on first use (all but the NumPy/SciPy augmentation), so
``from octseg.unet.config import UNetConfig`` does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "UNetConfig": "config", "TrainConfig": "config", "InferenceConfig": "config", "WeightMapConfig": "config",
    "center_crop": "losses", "soft_dice_loss": "losses", "weighted_cross_entropy": "losses",
    "adapted_rand_error": "metrics", "dice_per_class": "metrics", "iou_per_class": "metrics",
    "pixel_error": "metrics",
    "UNet": "model", "Unet": "model", "choose_tile_size": "model", "nearest_valid_input_size": "model",
    "output_size": "model", "valid_input_sizes": "model",
    "predict_tiled": "tiling",
    "border_weight_map": "weights", "border_weight_map_reference": "weights", "border_weight_map_volume": "weights",
}

# eager: ``augment`` is both a submodule and a function, and the package attribute must be the function
from octseg.unet.augment import augment, elastic_deform  # noqa: E402, F401 - re-exported

__all__ = sorted([*_WHERE, "augment", "elastic_deform"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
