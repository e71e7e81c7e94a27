"""``octseg segment`` killed with SIGKILL in the middle of a volume, then run again: labels byte-identical
to an uninterrupted run, no volume segmented twice, nothing half-written visible in the archive; and two
runs at once on one archive share the volumes instead of both doing all of them."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from octseg.tasks.archive.store import open_archive

VOLUMES = [f"vol_{i}" for i in range(3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prefect_home) -> dict:
    """An archive of 3 volumes (64 B-scans of 128 x 192, 8 shards each: a run can be killed mid-volume) and a
    registered model (a random one that still predicts both classes, so its label shards are not all empty)."""
    import mlflow

    from octseg.tasks.tracking.models import log_unet
    from octseg.tasks.tracking.uri import ensure_experiment, using_tracking_uri
    from octseg.unet.model import UNet

    root = tmp_path_factory.mktemp("crash")
    archive = open_archive(root / "archive.zarr")
    rng = np.random.default_rng(0)
    for vid in VOLUMES:
        archive.write_volume(vid, rng.integers(0, 255, (64, 128, 192), dtype=np.uint8),
                             provenance={"source": vid, "source_sha256": vid, "reader": "test"})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    torch.manual_seed(0)
    with using_tracking_uri(uri), mlflow.start_run(experiment_id=ensure_experiment(uri, "crash")):
        log_unet(UNet(base_channels=16, depth=3), "m", metadata={"class_names": {"0": "background", "1": "fluid"}})
    return {"root": root, "archive": root / "archive.zarr", "uri": uri, "prefect_home": prefect_home}


def _segment(setup: dict, archive: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    uri = setup["uri"]
    env = {**os.environ, "OCTSEG_PROGRESS": "0", "PREFECT_HOME": str(setup["prefect_home"](cwd / "prefect"))}
    env.pop("PREFECT_API_URL", None)  # its own ephemeral server, as a user would run it
    return subprocess.Popen([sys.executable, "-m", "octseg.flows.cli", "segment", "--archive", str(archive),
                             "--model", "models:/m/1", "--tracking-uri", uri, "--device", "cpu", *extra],
                            cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _labels(archive: Path) -> dict[str, bytes | None]:
    arc = open_archive(archive, create=False)
    return {v: None if arc.prediction(v) is None else np.asarray(arc.prediction(v)[...]).tobytes() for v in VOLUMES}


def _written_at(archive: Path) -> dict[str, str | None]:
    arc = open_archive(archive, create=False)
    return {v: (arc.prediction_info(v) or {}).get("written_at") for v in VOLUMES}


def test_killed_segment_run_resumes_to_the_uninterrupted_labels(setup, tmp_path: Path) -> None:
    """One run killed mid-volume, then two runs at once on what it left (one test: each command run here starts
    its own Prefect server, which is most of the time)."""
    whole = tmp_path / "whole" / "archive.zarr"
    cut = tmp_path / "cut" / "archive.zarr"
    shutil.copytree(setup["archive"], whole)
    shutil.copytree(setup["archive"], cut)
    done = _segment(setup, whole, whole.parent, "--workers", "0")  # the uninterrupted run, meanwhile
    proc = _segment(setup, cut, cut.parent, "--workers", "0")
    staging = cut.parent / ".archive.zarr.staging"
    deadline = time.monotonic() + 300
    # wait until the first volume is published and the second one is being written ...
    while time.monotonic() < deadline and proc.poll() is None:
        published = sum((cut / v / "labels" / "prediction" / "zarr.json").is_file() for v in VOLUMES)
        if published >= 1 and any(staging.glob("*/tmp/labels/prediction/s0/c/*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-volume"
    os.killpg(proc.pid, signal.SIGKILL)  # ... and kill it there: no cleanup code runs
    proc.wait(timeout=60)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out[-3000:]
    reference = _labels(whole)
    assert all(reference.values())
    before = _written_at(cut)
    partial = _labels(cut)
    assert 1 <= sum(v is not None for v in partial.values()) < len(VOLUMES)
    for vid, labels in partial.items():  # what is published is whole and right; the rest is absent, not partial
        assert labels is None or labels == reference[vid], vid
    # two runs at once take over: they share what is left (each volume segmented once, by one of them) and
    # one of them takes over the killed run's claim
    # (the first in the killed run's folder and Prefect home, as a user runs the command again)
    reruns = [_segment(setup, cut, cut.parent if i == 0 else cut.parent / "rerun1", "--workers", "0") for i in range(2)]
    outs = [r.communicate(timeout=600)[0] for r in reruns]
    assert all(r.returncode == 0 for r in reruns), [o[-3000:] for o in outs]
    assert _labels(cut) == reference
    after = _written_at(cut)
    finished_before = [v for v in VOLUMES if before[v] is not None]
    assert all(after[v] == before[v] for v in finished_before)  # not segmented twice
    assert all("segment: " in o for o in outs), [o[-2000:] for o in outs]
    counts = [int(o.split("segment: ")[1].split(" segmented")[0]) for o in outs]
    assert sum(counts) == len(VOLUMES) - len(finished_before), outs
    claims = cut.parent / ".archive.zarr.claims"
    assert not claims.exists() or not any(claims.iterdir())  # the killed run's claim was taken over and released
