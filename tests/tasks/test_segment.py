"""Segmenting one volume: predictions with provenance, skipping what a model version already did."""
from __future__ import annotations

import numpy as np
import torch

from octseg.tasks.archive import open_archive
from octseg.tasks.classes import DEFAULT_CLASS_NAMES
from octseg.tasks.phantom import make_phantom_volume
from octseg.tasks.segment import segment_one
from octseg.unet import UNet
from octseg.unet.config import InferenceConfig

INFERENCE = InferenceConfig()


def _info(version: str) -> dict:
    return {"model_name": "m", "model_version": version, "run_id": "r", "model_uri": f"models:/m/{version}"}


def test_segment_then_skip_then_new_version(tmp_path):
    torch.manual_seed(0)
    arc = open_archive(tmp_path / "a.zarr")
    arc.write_volume("v", make_phantom_volume(3, 40, 56, seed=0).image,
                     provenance={"source": "p", "source_sha256": "s", "reader": "t"})
    model = UNet(base_channels=4, depth=2)
    calls = []
    first = segment_one(arc.path, "v", model, _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE,
                        qc_dir=tmp_path / "qc", progress=lambda d, t: calls.append(d))
    assert first.status == "segmented" and calls == [1, 2, 3]
    pred = arc.prediction("v")
    assert pred.shape == (3, 40, 56) and set(np.unique(pred[...])) <= {0, 1}
    assert arc.prediction_info("v")["model_version"] == "1"
    assert (tmp_path / "qc").is_dir() and first.qc_image.endswith(".png")
    assert segment_one(arc.path, "v", model, _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE).status == "skipped"
    again = segment_one(arc.path, "v", model, _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE, force=True)
    assert again.status == "segmented"
    assert segment_one(arc.path, "v", model, _info("2"), dict(DEFAULT_CLASS_NAMES), INFERENCE).status == "segmented"
    assert arc.prediction_info("v")["model_version"] == "2"
