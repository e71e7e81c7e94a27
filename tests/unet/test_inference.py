"""Whole-B-scan inference against the overlap-tile path, the memory budget, and the pipelined volume loop."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from octseg.unet.config import InferenceConfig, UNetConfig
from octseg.unet.inference import (
    activation_bytes,
    covering_input,
    plan_inference,
    predict_probabilities,
    segment_bscans,
    segment_volume,
)
from octseg.unet.model import UNet, output_size


def _model(**kw) -> UNet:
    torch.manual_seed(0)
    model = UNet(base_channels=4, **{"depth": 2, **kw})
    return model.eval()


@pytest.mark.parametrize("n, depth", [(1, 2), (37, 2), (64, 3), (496, 4), (768, 4)])
def test_covering_input_is_the_smallest_valid_input_whose_output_covers_n(n, depth):
    m = covering_input(n, depth, "valid")
    assert output_size(m, depth) >= n
    smaller = [k for k in range(1, m) if _valid(k, depth) and output_size(k, depth) >= n]
    assert not smaller


def _valid(k: int, depth: int) -> bool:
    try:
        output_size(k, depth)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("shape", [(37, 53), (64, 96), (130, 41)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_whole_pass_equals_aligned_tiles(shape, overlap):
    """The rule of the module doc: tiles at multiples of 2**depth agree with one whole pass."""
    model = _model()
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    whole = predict_probabilities(model, image, InferenceConfig(device="cpu"))
    tiled = predict_probabilities(model, image, InferenceConfig(device="cpu", whole=False, max_tile=44,
                                                                overlap=overlap))
    assert whole.shape == tiled.shape == (2, *shape)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert (tiled.argmax(0) == whole.argmax(0)).mean() > 0.999


def test_unaligned_tiles_differ_which_is_why_tiles_are_aligned():
    """Reference for the rule: a tile shifted by a non-multiple of 2**depth gives other numbers."""
    model = _model()
    image = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 1, 60, 60)).astype(np.float32))
    with torch.no_grad():
        a = model(image[..., 0:44, 0:44])[..., 2:, 2:]
        b = model(image[..., 2:46, 2:46])[..., :-2, :-2]  # shifted by 2 (depth 2: stride 4)
        c = model(image[..., 4:48, 4:48])[..., :-4, :-4]  # shifted by 4
        a4 = model(image[..., 0:44, 0:44])[..., 4:, 4:]
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(c, a4, atol=1e-5, rtol=1e-5)


def test_plan_whole_when_it_fits_the_budget_else_tiles():
    cfg = UNetConfig(base_channels=16, depth=4)
    need = activation_bytes(cfg, (684, 956))  # the smallest valid input whose output (500 x 772) covers 496 x 768
    whole = plan_inference(cfg, (496, 768), InferenceConfig(), need)
    assert whole.whole and whole.tile_in == (684, 956) and whole.tile_out == (500, 772) and whole.batch == 1
    assert plan_inference(cfg, (496, 768), InferenceConfig(), 3 * need, "cuda").batch == 3  # what the budget holds
    assert plan_inference(cfg, (496, 768), InferenceConfig(), 3 * need, "cpu").batch == 1  # faster one at a time
    assert plan_inference(cfg, (496, 768), InferenceConfig(batch_size=2), 10 * need).batch == 2
    tiles = plan_inference(cfg, (496, 768), InferenceConfig(), need - 1)
    assert not tiles.whole and tiles.tile_in == (572, 572) and tiles.align == 16
    tall = plan_inference(cfg, (200, 3000), InferenceConfig(), need)  # rectangular tiles: all rows, some columns
    assert not tall.whole and tall.tile_in[0] == covering_input(200, 4, "valid") and tall.tile_in[1] == 572
    assert plan_inference(cfg, (496, 768), InferenceConfig(tile_size=380), 10 * need).tile_in == (380, 380)


def test_tiny_bscans_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="smaller than the network's stride"):
        plan_inference(UNetConfig(depth=4), (1, 1), InferenceConfig(), 2**30)


def test_nan_bscans_are_named():
    volume = np.zeros((5, 32, 40), np.float32)
    volume[3, 4, 4] = np.nan
    with pytest.raises(ValueError, match=r"B-scan\(s\) \[3\] hold NaN"):
        segment_volume(_model(), volume, InferenceConfig(device="cpu"))


def test_tta_is_symmetric_and_close_to_the_plain_prediction():
    model = _model()
    image = np.random.default_rng(3).normal(size=(40, 56)).astype(np.float32)
    tta = predict_probabilities(model, image, InferenceConfig(device="cpu", tta=True))
    mirrored = predict_probabilities(model, image[:, ::-1].copy(), InferenceConfig(device="cpu", tta=True))
    np.testing.assert_allclose(mirrored[:, :, ::-1], tta, atol=1e-5)
    np.testing.assert_allclose(tta.sum(0), 1.0, atol=1e-5)


def test_segment_bscans_reads_ahead_writes_behind_and_matches_one_pass():
    model = _model()
    volume = np.random.default_rng(4).normal(size=(11, 36, 44)).astype(np.float32)
    threads, written = set(), {}

    def read(a, b):
        threads.add(("read", threading.current_thread().name))
        return volume[a:b]

    def write(z0, labels):
        threads.add(("write", threading.current_thread().name))
        written[z0] = labels

    segment_bscans(model, read, len(volume), write, InferenceConfig(device="cpu"), chunk=4, image_hw=(36, 44))
    assert sorted(written) == [0, 4, 8] and [len(written[z]) for z in (0, 4, 8)] == [4, 4, 3]
    assert {name for kind, name in threads} == {"octseg-prefetch", "octseg-writer"}
    labels = np.concatenate([written[z] for z in (0, 4, 8)])
    reference = np.stack([predict_probabilities(model, b, InferenceConfig(device="cpu")).argmax(0) for b in volume])
    np.testing.assert_array_equal(labels, reference)


@pytest.mark.parametrize("where", ["read", "write"])
def test_an_error_in_either_thread_stops_the_volume(where):
    model = _model()
    volume = np.zeros((12, 32, 32), np.float32)

    def read(a, b):
        if where == "read" and a >= 4:
            raise OSError("disk gone")
        return volume[a:b]

    def write(z0, labels):
        if where == "write":
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        segment_bscans(model, read, len(volume), write, InferenceConfig(device="cpu"), chunk=2, image_hw=(32, 32))
