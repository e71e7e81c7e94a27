"""Run a U-Net over whole B-scans and volumes with the overlap-tile strategy.

The network is wrapped into a numpy predictor and handed to :func:`octseg.unet.tiling.predict_tiled`, so the
tiling itself stays pure and is tested without a network.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from octseg.unet.config import InferenceConfig
from octseg.unet.model import choose_tile_size
from octseg.unet.tiling import predict_tiled

__all__ = ["resolve_device", "torch_predictor", "predict_probabilities", "segment_volume"]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; an explicit ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    return device


def torch_predictor(
    model: torch.nn.Module, device: torch.device | None = None, amp: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap ``model`` as ``f(batch float32 (N, C, T, T)) -> softmax probabilities float32 (N, K, O, O)``."""
    device = device or next(model.parameters()).device
    model.eval()
    use_amp = amp and device.type == "cuda"

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    return predict


def predict_probabilities(
    model: torch.nn.Module, image: np.ndarray, cfg: InferenceConfig = InferenceConfig()
) -> np.ndarray:
    """Class probabilities float32 (K, H, W) for one normalised B-scan (H, W), on the model's device."""
    tile = cfg.tile_size or choose_tile_size(model.config, image.shape[-2:], cfg.max_tile)
    return predict_tiled(
        image, torch_predictor(model, amp=cfg.amp), tile, overlap=cfg.overlap, batch_size=cfg.batch_size,
        output_tile=model.output_size(tile),
    )


def segment_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    cfg: InferenceConfig = InferenceConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Arg-max labels uint8 (Z, H, W) for a normalised (Z, H, W) volume, B-scan by B-scan."""
    out = np.empty(volume.shape, dtype=np.uint8)
    for z, bscan in enumerate(volume):
        out[z] = predict_probabilities(model, bscan, cfg).argmax(0)
        if progress is not None:
            progress(z + 1, len(volume))
    return out
