"""A real training process killed with SIGKILL in the middle of an epoch, then the same command again:
the unfinished MLflow run is continued from its last checkpoint and ends with exactly the weights of an
uninterrupted run (CPU, fixed seed)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from octseg.tasks.synthetic.phantom import write_phantom_files

TRAIN = ["--base-channels", "8", "--depth", "2", "--epochs", "5", "--tiles-per-epoch", "48", "--batch-size", "4",
         "--optimizer", "adam", "--lr", "0.001", "--max-tile", "64", "--device", "cpu"]


def _train(archive: Path, db: Path, cwd: Path, prefect_home) -> subprocess.Popen:
    env = {**os.environ, "OCTSEG_PROGRESS": "0", "PREFECT_HOME": str(prefect_home(cwd / "prefect"))}
    env.pop("PREFECT_API_URL", None)  # each command on its own ephemeral server, as a user would run it
    return subprocess.Popen([sys.executable, "-m", "octseg.flows.cli", "train", "--archive", str(archive),
                             "--tracking-uri", f"sqlite:///{db}", *TRAIN], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _weights(db: Path) -> dict[str, torch.Tensor]:
    from octseg.tasks.tracking.models import load_unet, resolve_model

    uri = f"sqlite:///{db}"
    return load_unet(resolve_model("models:/octseg-unet@champion", uri), uri).state_dict()


def _checkpoint(root: Path) -> Path | None:
    found = list(root.glob("mlartifacts/**/checkpoint/last.pt"))
    return found[0] if found else None


def test_killed_training_resumes_to_the_uninterrupted_weights(tmp_path: Path, prefect_home) -> None:
    sources = write_phantom_files(tmp_path / "scans", n_volumes=2, n_bscans=4, height=64, width=96)
    from octseg.flows.config import IngestConfig
    from octseg.flows.ingest import ingest_volumes

    archive = tmp_path / "archive.zarr"
    ingest_volumes(IngestConfig(sources=tuple(sources), archive=archive, labels=tmp_path / "scans" / "labels"))

    whole = tmp_path / "whole"
    whole.mkdir()
    done = _train(archive, whole / "mlflow.db", whole, prefect_home)  # the uninterrupted run, beside the killed one
    cut = tmp_path / "cut"
    cut.mkdir()
    proc = _train(archive, cut / "mlflow.db", cut, prefect_home)
    deadline, first_mtime = time.monotonic() + 300, None
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the second checkpoint ...
        ckpt = _checkpoint(cut)
        if ckpt is not None:
            mtime = ckpt.stat().st_mtime_ns
            if first_mtime is None:
                first_mtime, t_first = mtime, time.monotonic()
            elif mtime != first_mtime:
                epoch_seconds = time.monotonic() - t_first
                time.sleep(epoch_seconds / 2)  # ... then kill the process in the middle of the next epoch
                break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"training ended before it could be killed: {proc.communicate()[0][-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    out, _ = done.communicate(timeout=400)
    assert done.returncode == 0, out[-3000:]
    state = torch.load(_checkpoint(cut), weights_only=True)
    assert 1 <= state["epoch"] < 4, state["epoch"]  # killed mid-way, with work left

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cut / 'mlflow.db'}")
    (killed,) = client.search_runs([client.get_experiment_by_name("octseg").experiment_id])
    assert killed.info.status == "RUNNING"  # SIGKILL left it unfinished

    again = _train(archive, cut / "mlflow.db", cut, prefect_home)
    out, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("octseg").experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"  # the same run, continued
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(set(epochs)) == [0, 1, 2, 3, 4]
    resumed, reference = _weights(cut / "mlflow.db"), _weights(whole / "mlflow.db")
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)
