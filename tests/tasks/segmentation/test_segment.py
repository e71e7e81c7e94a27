"""Segmenting one volume: predictions with provenance, skipping what a model version already did."""
from __future__ import annotations

import numpy as np
import torch

from octseg.tasks.archive.store import open_archive
from octseg.tasks.archive.classes import DEFAULT_CLASS_NAMES
from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.tasks.segmentation.segment import segment_one
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
    assert first.status == "segmented" and calls == [3]  # one shard of B-scans
    pred = arc.prediction("v")
    assert pred.shape == (3, 40, 56) and set(np.unique(pred[...])) <= {0, 1}
    assert arc.prediction_info("v")["model_version"] == "1"
    assert (tmp_path / "qc").is_dir() and first.qc_image.endswith(".png")
    assert segment_one(arc.path, "v", model, _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE).status == "skipped"
    again = segment_one(arc.path, "v", model, _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE, force=True)
    assert again.status == "segmented"
    assert segment_one(arc.path, "v", model, _info("2"), dict(DEFAULT_CLASS_NAMES), INFERENCE).status == "segmented"
    assert arc.prediction_info("v")["model_version"] == "2"


def _archive_with(tmp_path, n=3, scale=None, source_sha="s"):
    arc = open_archive(tmp_path / "a.zarr")
    arc.write_volume("v", make_phantom_volume(n, 40, 56, seed=0).image, scale_um=scale,
                     provenance={"source": "p", "source_sha256": source_sha, "reader": "t"})
    return arc


def test_prediction_carries_a_report_and_the_csv_lists_it(tmp_path):
    import csv

    from octseg.tasks.segmentation.segment import write_segmentation_csv

    torch.manual_seed(0)
    arc = _archive_with(tmp_path, n=10, scale=(100.0, 4.0, 10.0))
    segment_one(arc.path, "v", UNet(base_channels=4, depth=2), _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE)
    report = arc.prediction_info("v")["report"]
    pred = arc.prediction("v")[...]
    assert report["bscans"] == 10
    assert report["pixels"] == {"background": int((pred == 0).sum()), "fluid": int((pred == 1).sum())}
    assert report["volume_mm3"]["fluid"] == round(int((pred == 1).sum()) * 100 * 4 * 10 * 1e-9, 6)
    assert report["seconds"] > 0
    arc.write_volume("w", make_phantom_volume(2, 40, 56, seed=1).image,  # no voxel size: no volume in mm^3
                     provenance={"source": "q", "source_sha256": "t", "reader": "t"})
    segment_one(arc.path, "w", UNet(base_channels=4, depth=2), _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE)
    rows = list(csv.DictReader(write_segmentation_csv(arc.path).open()))
    assert [r["volume_id"] for r in rows] == ["v", "w"]
    assert rows[0]["fluid_mm3"] == str(report["volume_mm3"]["fluid"]) and rows[1]["fluid_mm3"] == ""
    assert rows[0]["pixels_fluid"] == str(report["pixels"]["fluid"]) and rows[0]["model_version"] == "1"


def test_a_volume_reingested_while_segmented_keeps_no_prediction_of_the_old_image(tmp_path):
    from octseg.tasks.archive.layout import ArchiveError
    from octseg.tasks.archive.store import already_segmented

    torch.manual_seed(0)
    arc = _archive_with(tmp_path, n=20)
    new_image = make_phantom_volume(20, 40, 56, seed=9).image

    def reingest_midway(done, total):
        if done < total and not arc.volume_meta("v")["source_sha256"] == "changed":
            arc.write_volume("v", new_image, provenance={"source": "p", "source_sha256": "changed", "reader": "t"})

    with np.testing.assert_raises_regex(ArchiveError, "re-ingested while it was segmented"):
        segment_one(arc.path, "v", UNet(base_channels=4, depth=2), _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE,
                    progress=reingest_midway)
    assert arc.prediction("v") is None
    assert not list((tmp_path / ".a.zarr.staging").glob("*")) if (tmp_path / ".a.zarr.staging").exists() else True
    # a prediction recorded for another image is not "done": the rerun segments the current image
    segment_one(arc.path, "v", UNet(base_channels=4, depth=2), _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE)
    assert already_segmented(arc, "v", "m", "1")
    arc.write_volume("v", make_phantom_volume(20, 40, 56, seed=3).image,
                     provenance={"source": "p", "source_sha256": "again", "reader": "t"})
    assert not already_segmented(arc, "v", "m", "1")


def test_a_model_without_the_archives_classes_is_refused_by_name(tmp_path):
    import pytest

    from octseg.tasks.segmentation.segment import check_model_classes

    arc = open_archive(tmp_path / "a.zarr")
    labels = np.zeros((2, 40, 56), np.uint8)
    labels[0, 5:9, 5:9] = 3
    arc.write_volume("layers", make_phantom_volume(2, 40, 56, seed=0).image, manual_labels=labels,
                     provenance={"source": "p", "source_sha256": "s", "reader": "t"})
    with pytest.raises(ValueError, match="layers: its manual labels hold class 3"):
        check_model_classes(arc, "layers", dict(DEFAULT_CLASS_NAMES))
    check_model_classes(arc, "layers", {i: f"c{i}" for i in range(4)})


MEMORY_SCRIPT = """
import resource, sys, torch
from octseg.tasks.segmentation.segment import segment_one
from octseg.unet import UNet
from octseg.unet.config import InferenceConfig
torch.manual_seed(0)
torch.set_num_threads(1)
info = {"model_name": "m", "model_version": "1", "run_id": "r", "model_uri": "models:/m/1"}
segment_one(sys.argv[1], sys.argv[2], UNet(base_channels=4, depth=2), info, {0: "background", 1: "fluid"},
            InferenceConfig(device="cpu"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_memory_stays_flat_for_deep_volumes(tmp_path):
    """Peak RSS of segmenting a 512-B-scan volume is within a small bound of a 32-B-scan one: B-scans
    stream through in shards (the 512 volume's float32 image alone would be 64 MiB)."""
    import subprocess
    import sys

    arc = open_archive(tmp_path / "a.zarr")
    rng = np.random.default_rng(0)
    for n in (32, 512):
        arc.write_volume(f"d{n}", rng.integers(0, 255, (n, 256, 128), dtype=np.uint8),
                         provenance={"source": str(n), "source_sha256": str(n), "reader": "t"})
    peak = {}
    for n in (32, 512):
        done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(arc.path), f"d{n}"], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peak[n] = int(done.stdout.split()[-1])
    assert arc.prediction("d512").shape == (512, 256, 128)
    assert peak[512] - peak[32] < 40, peak  # MiB


def test_a_volume_claimed_by_a_live_run_is_busy_and_a_dead_runs_claim_is_taken_over(tmp_path):
    import json
    import os
    import socket
    import subprocess

    from octseg.tasks.archive.claims import claim_volume, VolumeBusy

    torch.manual_seed(0)
    arc = _archive_with(tmp_path)
    model = UNet(base_channels=4, depth=2)
    with claim_volume(arc.path, "v"):
        with np.testing.assert_raises(VolumeBusy):
            with claim_volume(arc.path, "v"):
                pass
        assert segment_one(arc.path, "v", model, _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE).status == "busy"
    assert arc.prediction("v") is None
    # a claim left behind by a process that died (kill -9) blocks nobody
    dead = subprocess.Popen(["true"])
    dead.wait()
    claims = tmp_path / ".a.zarr.claims"
    claims.mkdir()
    (claims / "v").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    assert segment_one(arc.path, "v", model, _info("1"), dict(DEFAULT_CLASS_NAMES), INFERENCE).status == "segmented"
    assert not claims.exists() or not os.listdir(claims)


def test_a_claim_being_written_counts_as_held(tmp_path):
    """A claim file that exists but cannot be read yet is alive while it is young."""
    from octseg.tasks.archive.claims import claim_volume, VolumeBusy

    claims = tmp_path / ".a.zarr.claims"
    claims.mkdir()
    (claims / "v").write_text("")
    with np.testing.assert_raises(VolumeBusy):
        with claim_volume(tmp_path / "a.zarr", "v"):
            pass
