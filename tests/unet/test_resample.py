"""Networks that see B-scans resampled, ensembles of networks, and their inference."""
from __future__ import annotations

import numpy as np
import torch

from octseg.unet.config import InferenceConfig, UNetConfig
from octseg.unet.ensemble import UNetEnsemble
from octseg.unet.inference import predict_probabilities, segment_volume
from octseg.unet.model import UNet
from octseg.unet.resample import resample_labels, resample_probabilities, resample_set, scaled_size
from octseg.unet.bscans import BScanSet

CPU = InferenceConfig(device="cpu")


def test_labels_shrink_by_the_class_covering_most() -> None:
    labels = np.zeros((1, 4, 4), np.int64)
    labels[0, :2, :2] = 1  # the top-left 2x2 block: one output pixel of class 1
    labels[0, 2, 2] = 2  # one pixel of four: the block stays background
    assert resample_labels(labels, (2, 2), 3).tolist() == [[[1, 0], [0, 0]]]


def test_unannotated_pixels_stay_ignored_when_labels_shrink() -> None:
    labels = np.zeros((1, 4, 6), np.int64)
    labels[0, :, :2] = -100  # the first two columns unannotated (ignored by the losses)
    labels[0, :2, 2:4] = 1
    labels[0, 2, 4] = -100  # one pixel of four: the block stays background
    out = resample_labels(labels, (2, 3), 2)
    assert out.tolist() == [[[-100, 1, 0], [-100, 0, 0]]]  # before: -100 became background
    assert out.dtype == labels.dtype


def test_probabilities_come_back_at_the_bscan_size() -> None:
    p = np.random.default_rng(0).random((2, 3, 5, 7)).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    up = resample_probabilities(p, (10, 14))
    assert up.shape == (2, 3, 10, 14) and np.allclose(up.sum(axis=1), 1, atol=1e-5)


def test_resampled_network_predicts_at_full_size() -> None:
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, padding="same", scale_y=0.5, scale_x=0.5).eval()
    images = np.random.default_rng(1).standard_normal((3, 40, 56)).astype(np.float32)
    assert scaled_size(model.config, (40, 56)) == (20, 28)
    probs = predict_probabilities(model, images[0], CPU)
    assert probs.shape == (2, 40, 56)
    labels = segment_volume(model, images, CPU)
    assert labels.shape == (3, 40, 56) and (labels[0] == probs.argmax(0)).all()
    small = resample_set(BScanSet(images, np.zeros((3, 40, 56), np.int64)), model.config)
    assert small.images.shape == (3, 20, 28) and small.labels.shape == (3, 20, 28)


def test_ensemble_gives_the_mean_of_its_members_probabilities() -> None:
    torch.manual_seed(0)
    config = UNetConfig(base_channels=4, depth=2)
    members = [UNet(config).eval() for _ in range(3)]
    ensemble = UNetEnsemble.from_state_dicts(config, [m.state_dict() for m in members]).eval()
    image = np.random.default_rng(2).standard_normal((44, 44)).astype(np.float32)
    mean = np.mean([predict_probabilities(m, image, CPU) for m in members], axis=0)
    assert np.allclose(predict_probabilities(ensemble, image, CPU), mean, atol=1e-5)
    tta = np.mean([predict_probabilities(m, image, InferenceConfig(device="cpu", tta=True)) for m in members], axis=0)
    assert np.allclose(predict_probabilities(ensemble, image, InferenceConfig(device="cpu", tta=True)), tta, atol=1e-5)


def test_ensemble_members_share_one_architecture() -> None:
    import pytest

    with pytest.raises(ValueError, match="share one UNetConfig"):
        UNetEnsemble([UNet(base_channels=4, depth=2), UNet(base_channels=8, depth=2)])
