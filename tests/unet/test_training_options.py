"""The training options of the generalisation work: schedules, augmentation knobs, norms, deep supervision."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from octseg.unet.augment import augment, elastic_deform, noise_and_blur, random_affine
from octseg.unet.bscans import BScanSet
from octseg.unet.config import TrainConfig, UNetConfig
from octseg.unet.model import UNet
from octseg.unet.normalize import normalize_volume
from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.unet.train import augmentation, fit, lr_factor, training_loss


@pytest.mark.parametrize("schedule, t, expected", [
    ("constant", 0.7, 1.0), ("poly", 0.0, 1.0), ("poly", 0.5, 0.5**0.9), ("poly", 1.0, 0.0),
    ("cosine", 0.0, 1.0), ("cosine", 0.5, 0.5), ("cosine", 1.0, 0.0),
])
def test_lr_factor(schedule: str, t: float, expected: float) -> None:
    assert lr_factor(schedule, int(t * 200), 200) == pytest.approx(expected)


def test_rotation_by_90_degrees_is_a_quarter_turn() -> None:
    image = np.arange(49, dtype=np.float64).reshape(7, 7)
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])  # samples (y, x) <- (-x, y) about the centre
    out, _, _ = elastic_deform(image, sigma=0.0, rng=0, affine=quarter, image_order=1, backend="scipy")
    assert np.allclose(out, np.rot90(image, k=-1), atol=1e-9) or np.allclose(out, np.rot90(image), atol=1e-9)


def test_random_affine_stays_in_its_ranges() -> None:
    for seed in range(50):
        a = random_affine(seed, rotation=15, scaling=0.25)
        zoom = 1 / np.sqrt(abs(np.linalg.det(a)))
        angle = np.degrees(np.arctan2(a[1, 0], a[0, 0]))
        assert 0.8 - 1e-9 <= zoom <= 1.25 + 1e-9 and abs(angle) <= 15 + 1e-9
    assert np.allclose(random_affine(0), np.eye(2))


def test_the_paper_augmentation_draws_as_before() -> None:
    """New knobs at their defaults leave the paper's chain (and every seeded run) unchanged."""
    image = np.random.default_rng(0).standard_normal((30, 30)).astype(np.float32)
    labels = (image > 1).astype(np.uint8)
    a = augment(image, labels, None, 5)
    b = augment(image, labels, None, 5, rotation=0.0, scaling=0.0, strength=0.1, noise=0.0, blur=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2]))


def test_strong_augmentation_keeps_labels_and_image_aligned() -> None:
    image = np.zeros((40, 40), np.float32)
    image[10:30, 15:25] = 1.0
    labels = (image > 0.5).astype(np.uint8)
    for seed in range(5):
        out, lab, _ = augment(image, labels, None, seed, rotation=30, scaling=0.3, strength=0.0, jitter=False)
        assert set(np.unique(lab)) <= {0, 1}
        assert abs(float(out[lab == 1].mean()) - 1.0) < 0.1 and abs(float(out[lab == 0].mean())) < 0.1


def test_noise_and_blur_change_only_the_image_statistics() -> None:
    image = np.zeros((32, 32), np.float32)
    image[16, 16] = 1.0
    seen = {"noise": False, "blur": False}
    for seed in range(40):
        out = noise_and_blur(image, seed, noise=0.5, blur=2.0, p_noise=0.5, p_blur=0.5)
        seen["blur"] |= out[16, 16] < 0.9 and abs(out.sum() - 1.0) < 0.5
        seen["noise"] |= float(out[0:8, 0:8].std()) > 0.01
    assert all(seen.values())
    assert np.array_equal(noise_and_blur(image, 0), image)  # nothing asked, nothing done


def test_deep_supervision_weighs_levels_as_nnunet() -> None:
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=3, padding="same", deep_supervision=True)
    x = torch.randn(2, 1, 32, 48)
    outs = model(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(32, 48), (16, 24), (8, 12)]
    y, w = torch.randint(0, 2, (2, 32, 48)), torch.ones(2, 32, 48)
    by_hand = sum(c * training_loss(o, y[:, s // 2::s, s // 2::s], w[:, s // 2::s, s // 2::s], 0.0)
                  for c, o, s in zip((4 / 7, 2 / 7, 1 / 7), outs, (1, 2, 4)))
    assert torch.allclose(training_loss(outs, y, w, 0.0), by_hand)
    model.eval()
    assert model(x).shape == (2, 2, 32, 48)  # inference sees the finest logits only


def test_deep_supervision_and_norms_are_checked() -> None:
    with pytest.raises(ValueError, match="deep_supervision needs padding 'same'"):
        UNetConfig(deep_supervision=True)
    with pytest.raises(ValueError, match="exclude each other"):
        UNetConfig(batch_norm=True, instance_norm=True)
    norms = [type(m).__name__ for m in UNet(base_channels=4, depth=2, instance_norm=True).modules()]
    assert "InstanceNorm2d" in norms and "BatchNorm2d" not in norms


def test_fit_with_the_new_options_runs_and_learns() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 48, 64), np.int64)
    labels[:, 16:32, 20:40] = 1
    images = (labels + 0.3 * rng.standard_normal(labels.shape)).astype(np.float32)
    data = BScanSet(images, labels, np.ones(labels.shape, np.float32))
    model = UNet(base_channels=4, depth=2, padding="same", instance_norm=True, deep_supervision=True,
                 scale_y=0.5, scale_x=0.5)
    cfg = TrainConfig(epochs=6, batch_size=2, tiles_per_epoch=8, optimizer="adam", lr=0.01, lr_schedule="poly",
                      dice_weight=1.0, rotation=10, scaling=0.1, jitter=0.2, noise=0.05, blur=1.0,
                      border_weights=False, device="cpu", max_tile=24)
    history = fit(model, data, None, cfg)
    assert len(history) == 6 and history[-1].train_loss < history[0].train_loss


def test_weight_average_is_the_exponential_average_of_each_step() -> None:
    """``ema=d`` ends with e_n, e_1 = w_1, e_k = d e_(k-1) + (1 - d) w_k over the raw weights w_k after
    each step (one step an epoch here, so the checkpoints of a run without averaging are the w_k), for
    the parameters and the batch-norm statistics alike."""
    ph = make_phantom_volume(n_bscans=2, height=64, width=64, seed=3)
    data = BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64))
    cfg = TrainConfig(epochs=5, batch_size=4, tiles_per_epoch=4, optimizer="adam", lr=1e-2, max_tile=64,
                      restore_best=False)
    raw: list[dict[str, torch.Tensor]] = []
    torch.manual_seed(0)
    fit(UNet(base_channels=4, depth=2, batch_norm=True), data, None, cfg, on_checkpoint=lambda s: raw.append(s["model"]))
    decay = 0.5
    expected = {k: v.double() for k, v in raw[0].items()}
    for w in raw[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w[k].double() for k in expected}
    torch.manual_seed(0)
    averaged = UNet(base_channels=4, depth=2, batch_norm=True)
    fit(averaged, data, None, replace(cfg, ema=decay))
    state = averaged.state_dict()
    floats = [k for k, v in state.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floats)
    for key in floats:
        torch.testing.assert_close(state[key].double(), expected[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(state[floats[0]], raw[-1][floats[0]])  # not simply the last step's weights


def test_a_weight_average_dominated_by_the_first_steps_is_refused() -> None:
    ph = make_phantom_volume(n_bscans=1, height=64, width=64, seed=3)
    data = BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64))
    cfg = TrainConfig(epochs=2, batch_size=4, tiles_per_epoch=4, max_tile=64, ema=0.999)
    with pytest.raises(ValueError, match=r"ema 0.999 over 2 steps keeps 100% .* at most 0.2236"):
        fit(UNet(base_channels=4, depth=2), data, None, cfg)


def test_the_weight_average_is_what_is_validated_and_kept() -> None:
    """With a validation set, the best epoch is judged on the averaged weights, and those are kept: the
    returned model scores what its epoch recorded (the raw weights of that epoch score otherwise)."""
    from octseg.unet.train import evaluate, validation_inference

    ph = make_phantom_volume(n_bscans=2, height=64, width=64, seed=4)
    data = BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64))
    cfg = TrainConfig(epochs=3, batch_size=2, tiles_per_epoch=4, optimizer="adam", lr=1e-2, max_tile=64, ema=0.3)
    raw: dict[int, dict[str, torch.Tensor]] = {}
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, batch_norm=True)
    history = fit(model, data, data, cfg, on_checkpoint=lambda s: raw.__setitem__(s["epoch"], s["model"]))
    dice = [h.val_dice[1] for h in history]
    best = int(np.nanargmax(dice))
    assert evaluate(model, data, validation_inference(cfg))[1] == pytest.approx(dice[best], abs=1e-6)
    assert any(not torch.equal(model.state_dict()[k], raw[best][k]) for k in raw[best])  # not the raw weights


def test_elastic_sigma_sets_how_far_the_deformation_moves_pixels() -> None:
    """``elastic_sigma`` reaches the paper's deformation: 0 leaves the tile as it was, and a larger s.d. moves
    pixels further (the same draws, scaled)."""
    from scipy import ndimage

    image = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((64, 64)), 3)
    moved = []
    for sigma in (0.0, 2.0, 8.0):
        keywords = augmentation(TrainConfig(elastic_sigma=sigma))
        assert keywords["sigma"] == sigma
        out, _, _ = augment(image, (image > 0).astype(np.int64), None, 0, flip=False, jitter=False, **keywords)
        moved.append(float(np.abs(out - image).mean()))
    assert moved[0] < 1e-4 < moved[1] < moved[2], moved
