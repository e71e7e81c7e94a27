"""CUDA paths (bf16 autocast, channels_last, torch.compile, AMP training); skipped without a GPU.

``benchmarks/gpu.sh`` runs them (``pytest -m gpu``) on a lent GPU machine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from octseg.unet.config import InferenceConfig, TrainConfig
from octseg.unet.bscans import BScanSet
from octseg.unet.inference import segment_volume
from octseg.unet.model import UNet
from octseg.unet.train import fit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _volume(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 120, 200)).astype(np.float32)


def test_bf16_channels_last_inference_agrees_with_cpu_fp32() -> None:
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=3)
    cpu = segment_volume(model, _volume(), InferenceConfig(device="cpu"))
    gpu = segment_volume(model.cuda(), _volume(), InferenceConfig(device="cuda", amp=True))
    assert (cpu == gpu).mean() > 0.98


def test_compiled_inference_equals_eager() -> None:
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=3).cuda()
    eager = segment_volume(model, _volume(), InferenceConfig(device="cuda"))
    compiled = segment_volume(model, _volume(), InferenceConfig(device="cuda", compile=True))
    assert (eager == compiled).mean() > 0.999


def test_amp_training_learns_on_cuda() -> None:
    labels = np.zeros((4, 96, 128), np.int64)
    labels[:, 30:60, 40:90] = 1
    images = (labels + 0.3 * np.random.default_rng(1).standard_normal(labels.shape)).astype(np.float32)
    model = UNet(base_channels=8, depth=3, padding="same", batch_norm=True)
    cfg = TrainConfig(epochs=5, batch_size=4, tiles_per_epoch=16, optimizer="adam", lr=0.01, dice_weight=1.0,
                      device="cuda", amp=True, max_tile=64, augment=False)
    history = fit(model, BScanSet(images, labels), None, cfg)
    assert history[-1].train_loss < history[0].train_loss
