"""The U-Net of Ronneberger, Fischer and Brox 2015 (arXiv 1505.04597) for OCT segmentation.

Pure PyTorch / NumPy / SciPy / scikit-image: this package never imports prefect, mlflow, zarr or dask.

- :class:`UNet` (alias :func:`Unet`) and :class:`UNetConfig`: the network, the paper's by default;
- :func:`border_weight_map`: w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2);
- :func:`weighted_cross_entropy`, :func:`soft_dice_loss`, :func:`center_crop`;
- :func:`predict_tiled`: the overlap-tile strategy for images of any size;
- :mod:`octseg.unet.augment`, :mod:`octseg.unet.metrics`, :mod:`octseg.unet.train`, :mod:`octseg.unet.inference`.
"""
from octseg.unet.augment import augment, elastic_deform
from octseg.unet.config import UNetConfig
from octseg.unet.losses import center_crop, soft_dice_loss, weighted_cross_entropy
from octseg.unet.metrics import adapted_rand_error, dice_per_class, iou_per_class, pixel_error
from octseg.unet.model import UNet, Unet, nearest_valid_input_size, output_size, valid_input_sizes
from octseg.unet.tiling import predict_tiled
from octseg.unet.weights import border_weight_map, border_weight_map_reference, border_weight_map_volume

__all__ = [
    "UNet",
    "Unet",
    "UNetConfig",
    "output_size",
    "valid_input_sizes",
    "nearest_valid_input_size",
    "border_weight_map",
    "border_weight_map_reference",
    "border_weight_map_volume",
    "weighted_cross_entropy",
    "soft_dice_loss",
    "center_crop",
    "dice_per_class",
    "iou_per_class",
    "pixel_error",
    "adapted_rand_error",
    "predict_tiled",
    "augment",
    "elastic_deform",
]
