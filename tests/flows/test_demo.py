"""``octseg demo`` end to end with one epoch: it reports a Dice and where things are; a rerun skips."""
from __future__ import annotations

import re

from octseg.flows.demo import HELDOUT, run_demo
from octseg.tasks.archive.store import open_archive


def test_demo_runs_and_a_second_run_skips_everything(tmp_path):
    report = run_demo(tmp_path, epochs=1, n_volumes=2)
    dice = float(re.search(rf"{HELDOUT}: fluid Dice (\S+)", report).group(1))
    assert 0.0 <= dice <= 1.0
    assert "mlflow ui --backend-store-uri sqlite:///" in report and "napari" in report
    archive = open_archive(tmp_path / "archive.zarr", create=False)
    assert archive.prediction_info(HELDOUT)["model_name"] == "octseg-unet"
    assert archive.scale_um(HELDOUT) is not None  # phantoms carry a physical voxel size
    assert list((tmp_path / "qc").glob("*.png"))
    again = run_demo(tmp_path, epochs=1, n_volumes=2)
    assert "ingest: 0 written, 3 up to date" in again and "already trained" in again
    assert "segment: 0 segmented, 3 already done" in again
