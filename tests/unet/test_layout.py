"""channels_last on the CPU (``CHANNELS_LAST_DEVICES``) changes the speed, not the results: inference and a
training step give what torch's default NCHW layout gives, to float tolerance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import octseg.unet.inference as inference
import octseg.unet.train as training
from octseg.unet.bscans import BScanSet
from octseg.unet.config import InferenceConfig, TrainConfig, UNetConfig
from octseg.unet.model import UNet

NETWORKS = [UNetConfig(base_channels=8, depth=3, padding="same", batch_norm=True, scale_y=0.5, scale_x=0.5),
            UNetConfig(base_channels=8, depth=2)]  # the paper's valid convolutions


def a_conv(model: UNet) -> torch.Tensor:
    return next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)  # 1 channel: either layout


@pytest.fixture
def contiguous_cpu(monkeypatch):
    """Switch the CPU layout off (torch's default NCHW) in both modules that read it."""
    def off() -> None:
        monkeypatch.setattr(inference, "CHANNELS_LAST_DEVICES", ("cuda",))
        monkeypatch.setattr(training, "CHANNELS_LAST_DEVICES", ("cuda",))
    return off


def test_the_cpu_runs_channels_last() -> None:
    assert "cpu" in inference.CHANNELS_LAST_DEVICES and training.CHANNELS_LAST_DEVICES is inference.CHANNELS_LAST_DEVICES
    model = UNet(NETWORKS[0])
    inference.predict_probabilities(model, np.zeros((64, 80), np.float32), InferenceConfig(device="cpu"))
    assert a_conv(model).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("config", NETWORKS, ids=["same-bn-resampled", "valid"])
def test_inference_is_the_same_in_either_layout(config: UNetConfig, contiguous_cpu) -> None:
    image = np.random.default_rng(0).normal(size=(100, 124)).astype(np.float32)
    torch.manual_seed(0)
    fast = UNet(config).eval()
    plain = UNet(config).eval()
    plain.load_state_dict(fast.state_dict())
    got = inference.predict_probabilities(fast, image, InferenceConfig(device="cpu", tta=True))
    contiguous_cpu()
    want = inference.predict_probabilities(plain, image, InferenceConfig(device="cpu", tta=True))
    assert a_conv(fast).is_contiguous(memory_format=torch.channels_last)
    assert a_conv(plain).is_contiguous()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_training_is_the_same_in_either_layout(contiguous_cpu) -> None:
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 96, 96)).astype(np.float32)
    labels = (images > 1.0).astype(np.int64)
    data = BScanSet(images, labels, np.ones_like(images))
    cfg = TrainConfig(epochs=2, batch_size=2, tiles_per_epoch=4, max_tile=64, device="cpu", restore_best=False,
                      optimizer="sgd", lr=0.01, augment=False, seed=3)  # Adam would magnify float noise near 0

    def trained(channels_last: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = UNet(NETWORKS[0])
        history = training.fit(model, data, None, cfg)
        assert a_conv(model).is_contiguous(memory_format=torch.channels_last) == channels_last
        return [h.train_loss for h in history], model.state_dict()

    fast_loss, fast_weights = trained(True)
    contiguous_cpu()
    plain_loss, plain_weights = trained(False)
    np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-4)
    for name, value in plain_weights.items():
        torch.testing.assert_close(fast_weights[name].contiguous(), value, rtol=1e-4, atol=1e-5, msg=name)
