"""Training tiles, the training loop and whole-image inference."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.unet import UNet, border_weight_map
from octseg.unet.config import InferenceConfig, TrainConfig, UNetConfig
from octseg.unet.data import BScanSet, TileDataset
from octseg.unet.inference import resolve_device, segment_volume
from octseg.unet.model import choose_tile_size
from octseg.unet.normalize import normalize_volume
from octseg.unet.train import evaluate, fit, validation_inference


def _coords_set(n=2, h=40, w=52) -> BScanSet:
    """Images whose pixel values encode their own (k, y, x), so crops can be traced back."""
    k, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    code = (k * 10_000 + y * 100 + x).astype(np.float32)
    return BScanSet(code, code.astype(np.int64), code / 7)


def test_tile_targets_are_the_centre_of_the_input_tile():
    data = _coords_set()
    ds = TileDataset(data, tile=24, output=8, n_tiles=20, augment=False, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 24, 24) and item["target"].shape == (8, 8)
        centre = item["image"][0, 8:16, 8:16]
        np.testing.assert_array_equal(centre.numpy().astype(np.int64), item["target"].numpy())
        np.testing.assert_allclose(item["weight"].numpy(), centre.numpy() / 7, rtol=1e-6)


def test_wide_tiles_target_the_centre_and_reach_every_column():
    """(height, width) tiles: the target is the centre of the input on both axes, and origins cover the width."""
    data = _coords_set(h=40, w=90)
    ds = TileDataset(data, tile=(24, 60), output=(8, 44), n_tiles=400, augment=False, seed=3)
    columns = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 24, 60) and item["target"].shape == (8, 44)
        centre = item["image"][0, 8:16, 8:52]
        np.testing.assert_array_equal(centre.numpy().astype(np.int64), item["target"].numpy())
        columns.update((item["target"].numpy() % 100).ravel().tolist())
    assert columns == set(range(90))
    augmented = TileDataset(data, (24, 60), (8, 44), 3, augment=True, seed=3)[0]
    assert augmented["image"].shape == (1, 24, 60) and augmented["weight"].shape == (8, 44)
    with pytest.raises(ValueError, match="does not fit"):
        TileDataset(data, (24, 110), (8, 94), 4)


@pytest.mark.parametrize(("wide", "max_tile", "expected"), [
    (False, 240, (176, 176)), (True, 240, (176, 240)), (True, 400, (176, 288))])
def test_training_tile_is_square_unless_wide(wide, max_tile, expected):
    from octseg.unet.train import training_tile

    config = UNetConfig(base_channels=4, depth=4, padding="same")
    assert training_tile(config, (186, 288), TrainConfig(max_tile=max_tile, wide_tiles=wide)) == expected
    assert training_tile(config, (186, 288), TrainConfig(tile_size=96, wide_tiles=wide)) == (96, 96)


def test_tiles_repeat_per_seed_and_epoch():
    data = _coords_set()
    a = TileDataset(data, 24, 8, 5, augment=True, seed=1)
    b = TileDataset(data, 24, 8, 5, augment=True, seed=1)
    assert torch.equal(a[2]["image"], b[2]["image"])
    b.set_epoch(1)
    assert not torch.equal(a[2]["image"], b[2]["image"])


def test_foreground_tiles_contain_foreground():
    labels = np.zeros((3, 60, 80), np.int64)
    labels[1, 50:53, 70:72] = 1  # one tiny pocket near a corner of one B-scan
    data = BScanSet(np.zeros(labels.shape, np.float32), labels)
    always = TileDataset(data, tile=24, output=8, n_tiles=40, augment=False, foreground=1.0)
    assert all(always[i]["target"].sum() > 0 for i in range(len(always)))
    never = TileDataset(data, tile=24, output=8, n_tiles=40, augment=False, foreground=0.0)
    assert sum(int(never[i]["target"].sum() > 0) for i in range(len(never))) < 5
    with pytest.raises(ValueError, match="foreground"):
        TileDataset(data, 24, 8, 4, foreground=1.5)


@pytest.mark.parametrize(
    "tile, output, message",
    [
        (24, 60, "does not fit"),  # output larger than the B-scans
        (25, 8, "odd"),  # halo would be half a pixel
    ],
)
def test_tile_dataset_rejects_bad_geometry(tile, output, message):
    with pytest.raises(ValueError, match=message):
        TileDataset(_coords_set(), tile, output, 4)


def test_choose_tile_size_fits_the_image():
    model = UNet(base_channels=4, depth=2)
    tile = choose_tile_size(model.config, (60, 90), max_input=128)
    assert model.output_size(tile) <= 60
    assert model.output_size(tile + 4) > 60 or tile + 4 > 128


@pytest.mark.parametrize(("config", "image_hw", "max_input", "expected"), [
    (UNetConfig(), (496, 768), 572, 572),  # the paper's tile for a Duke B-scan: 572 -> 388
    (UNetConfig(), (496, 768), 256, 252),  # a smaller cap: the largest valid tile below it
    (UNetConfig(depth=2), (64, 96), 572, 104),  # output 64 = the shorter side
    (UNetConfig(depth=2), (5, 5), 572, 44),  # smaller than any output: the smallest valid tile
    (UNetConfig(padding="same"), (64, 96), 572, 64),  # no halo: the tile is the shorter side
])
def test_one_tile_rule(config, image_hw, max_input, expected):
    """A brute-force reading of the rule: largest valid input <= max_input with output <= min(H, W)."""
    from octseg.unet.model import output_size, valid_input_sizes

    tile = choose_tile_size(config, image_hw, max_input)
    assert tile == expected
    fitting = [n for n in valid_input_sizes(1, max_input, config.depth, config.padding)
               if output_size(n, config.depth, config.padding) <= min(image_hw)]
    assert tile == (max(fitting) if fitting else valid_input_sizes(1, 200, config.depth, config.padding)[0])


def test_training_validates_the_way_segment_infers():
    """Validation during training sees B-scans as segment does by default (tile rule, cap), on its device."""
    cfg = TrainConfig(max_tile=188, device="cpu")
    assert validation_inference(cfg) == InferenceConfig(device="cpu")


def test_segment_volume_shapes_and_progress():
    model = UNet(base_channels=4, depth=2)
    calls = []
    out = segment_volume(model, np.random.default_rng(0).normal(size=(3, 37, 53)).astype(np.float32),
                         progress=lambda d, t: calls.append((d, t)))
    assert out.shape == (3, 37, 53) and out.dtype == np.uint8
    assert calls == [(3, 3)]  # one call per chunk of B-scans read, predicted and written


def test_cuda_request_without_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda")


def test_small_unet_overfits_one_phantom_bscan():
    """The acceptance check of the core: a small U-Net learns the fluid of one B-scan (Dice > 0.9)."""
    torch.manual_seed(0)
    ph = make_phantom_volume(n_bscans=3, height=96, width=128, seed=0)
    z = int(np.argmax(ph.fluid.sum(axis=(1, 2))))
    weights = border_weight_map(ph.fluid[z], instances=ph.fluid_instances[z])[None]
    data = BScanSet(normalize_volume(ph.image[z : z + 1]), ph.fluid[z : z + 1].astype(np.int64), weights)
    model = UNet(base_channels=8, depth=2)
    cfg = TrainConfig(epochs=60, batch_size=4, optimizer="adam", lr=3e-3, tiles_per_epoch=16, augment=False, max_tile=96)
    history = fit(model, data, None, cfg)
    assert history[-1].train_loss < history[0].train_loss / 5
    dice = evaluate(model, data)
    assert dice[1] > 0.9, dice  # fluid


def test_fit_reports_validation_dice_each_epoch():
    ph = make_phantom_volume(n_bscans=2, height=64, width=64, seed=1)
    data = BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64))
    seen = []
    fit(UNet(base_channels=4, depth=2), data, data, TrainConfig(epochs=2, tiles_per_epoch=4, max_tile=64),
        on_epoch_end=seen.append)
    assert [s.epoch for s in seen] == [0, 1]
    assert set(seen[-1].val_dice) == {0, 1}
    assert all(np.isfinite(s.train_loss) for s in seen)


def _phantom_set(seed: int = 1) -> BScanSet:
    ph = make_phantom_volume(n_bscans=2, height=64, width=64, seed=seed)
    return BScanSet(normalize_volume(ph.image), ph.fluid.astype(np.int64))


@pytest.mark.parametrize("ema", [0.0, 0.4])
def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(ema):
    """Checkpoint after epoch 1, rebuild everything, resume: the same weights as 4 epochs in one go
    (with a weight average, its state is in the checkpoint too)."""
    data = _phantom_set()
    cfg = TrainConfig(epochs=4, batch_size=2, tiles_per_epoch=4, optimizer="adam", lr=1e-3, max_tile=64,
                      restore_best=False, ema=ema)
    torch.manual_seed(0)
    whole = UNet(base_channels=4, depth=2, dropout=0.3)  # dropout: torch's RNG state matters
    fit(whole, data, data, cfg)
    checkpoints = []
    torch.manual_seed(0)  # the same initial weights
    first = UNet(base_channels=4, depth=2, dropout=0.3)
    fit(first, data, data, TrainConfig(**{**cfg.to_dict(), "epochs": 2}), on_checkpoint=checkpoints.append)
    assert [c["epoch"] for c in checkpoints] == [0, 1]
    buffer = io.BytesIO()
    torch.save(checkpoints[-1], buffer)  # what goes into the run's artifacts, and back
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = UNet(base_channels=4, depth=2, dropout=0.3)
    history = fit(resumed, data, data, cfg, resume=state)
    assert [h.epoch for h in history] == [0, 1, 2, 3]
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_best_epoch_restored_and_early_stopping():
    data = _phantom_set()
    seen, kept = [], {}
    cfg = TrainConfig(epochs=6, batch_size=2, tiles_per_epoch=4, optimizer="adam", lr=1e-3, max_tile=64, patience=2)

    def remember(state):
        kept[state["epoch"]] = {k: v.clone() for k, v in state["model"].items()}

    model = UNet(base_channels=4, depth=2)
    history = fit(model, data, data, cfg, on_epoch_end=seen.append, on_checkpoint=remember)
    dice = [h.val_dice[1] for h in history]
    best = int(np.nanargmax(dice))
    assert len(history) == 6 or len(history) - 1 - best == 2  # ran out, or stopped 2 epochs after the best
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, kept[best][key], rtol=0, atol=0)


def test_worker_processes_load_the_same_tiles():
    """Tiles are seeded by (seed, epoch, index): two spawned loader processes give the weights of none."""
    data = _phantom_set()
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = UNet(base_channels=4, depth=2)
        fit(model, data, None, TrainConfig(epochs=2, batch_size=2, tiles_per_epoch=6, optimizer="adam", lr=1e-3,
                                           max_tile=64, num_workers=workers))
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0)
