"""The drop-folder flow on real components: files still being written wait, new ones are ingested,
preprocessed and segmented with the champion, known content is not ingested twice, a bad file fails
the run but not the others, and a run with nothing new does nothing."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from octseg.flows.config import WatchConfig
from octseg.flows.runs import summary_of
from octseg.flows.watch import watch_inbox
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.inbox import scan_inbox
from octseg.tasks.synthetic.phantom import write_phantom_files


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> str:
    """A tiny U-Net registered as octseg-unet@champion in a SQLite MLflow."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from octseg.tasks.tracking.models import log_unet
    from octseg.tasks.tracking.uri import ensure_experiment, using_tracking_uri
    from octseg.unet.model import UNet

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    torch.manual_seed(0)
    with using_tracking_uri(uri), mlflow.start_run(experiment_id=ensure_experiment(uri, "watch")):
        version = log_unet(UNet(base_channels=4, depth=2), "octseg-unet",
                           metadata={"class_names": {"0": "background", "1": "fluid"}})
    MlflowClient(uri).set_registered_model_alias("octseg-unet", "champion", version)
    return uri


def test_watch_ingests_settled_new_files_and_segments_them(tmp_path: Path, champion: str) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive.zarr"
    files = write_phantom_files(inbox, n_volumes=3, n_bscans=3, height=48, width=64)
    shutil.rmtree(inbox / "labels")
    for f in files[:2]:
        _age(f, 300)  # settled; files[2] was just written: still "being copied"
    cfg = WatchConfig(inbox=inbox, archive=archive, settle_seconds=60, tracking_uri=champion, n_workers=0)
    state = watch_inbox(cfg, return_state=True)
    first = summary_of(state)
    assert state.is_completed(), state.message
    assert sorted(first.ingested) == ["phantom_000", "phantom_001"] and first.unsettled == 1
    assert sorted(first.segmented) == ["phantom_000", "phantom_001"]
    arc = open_archive(archive, create=False)
    assert arc.prediction("phantom_001").shape == (3, 48, 64)
    assert arc.derived_is_complete("phantom_000", "normalized")

    _age(files[2], 300)  # the copy finished; a renamed copy of a known file arrives too
    shutil.copy(files[0], inbox / "phantom_000_again.tif")
    _age(inbox / "phantom_000_again.tif", 300)
    (inbox / "broken.tif").write_bytes(b"not a tiff")
    _age(inbox / "broken.tif", 300)
    state = watch_inbox(cfg, return_state=True)
    second = summary_of(state)
    assert second.ingested == ["phantom_002"] and second.segmented == ["phantom_002"]
    assert second.known == 3  # phantom_000, _001 and the renamed copy of _000
    assert state.is_failed() and "broken.tif" in state.message  # the bad file fails the run, not the others
    assert "phantom_000_again" not in open_archive(archive, create=False).volume_ids()

    (inbox / "broken.tif").unlink()
    scan = scan_inbox(inbox, archive, settle_seconds=60)
    assert scan.new == [] and len(scan.known) == 4
    third = summary_of(watch_inbox(cfg, return_state=True))
    assert third.ingested == [] and "nothing new" in third.headline()


def test_watch_without_a_champion_still_ingests_and_says_why(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    files = write_phantom_files(inbox, n_volumes=1, n_bscans=2, height=48, width=64)
    _age(files[0], 300)
    cfg = WatchConfig(inbox=inbox, archive=tmp_path / "a.zarr", settle_seconds=60,
                      tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}", n_workers=0)
    state = watch_inbox(cfg, return_state=True)
    summary = summary_of(state)
    assert summary.ingested == ["phantom_000"] and summary.segmented == []
    assert state.is_failed() and any(f.startswith("segment") for f in summary.failures), summary.failures


def _broken_inbox(inbox: Path) -> list[Path]:
    """Six files a retry cannot fix: not a TIFF, truncated, empty, a garbage .npy, too large, not a PNG."""
    import numpy as np
    import tifffile

    inbox.mkdir(parents=True)
    whole = inbox / "whole.tif.part"
    tifffile.imwrite(whole, np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    data = whole.read_bytes()
    whole.unlink()
    files = {"text.tif": b"this is not a tiff\n", "truncated.tif": data[:300], "empty.tif": b"",
             "garbage.npy": b"\x93NUMPY garbage", "notes.png": b"not a png either"}
    for name, content in files.items():
        (inbox / name).write_bytes(content)
    tifffile.imwrite(inbox / "large.tif", np.zeros((4, 128, 128), np.uint8), photometric="minisblack")
    paths = sorted(inbox.iterdir())
    for p in paths:
        _age(p, 300)
    return paths


def test_watch_remembers_broken_files_until_they_change(tmp_path: Path, monkeypatch) -> None:
    from tests.flows.cli_runner import invoke
    from tests.tasks.ingest.test_known import OpenCounter

    inbox, archive = tmp_path / "inbox", tmp_path / "a.zarr"
    broken = _broken_inbox(inbox)
    args = ("watch", "--inbox", str(inbox), "--archive", str(archive), "--max-voxels", "20000")
    first = invoke(*args)
    assert first.exit_code == 1, first.plain
    for path in broken:  # each named once, as a failure
        assert f"failed: {path}" in first.plain, (path, first.plain)
    assert "AwaitingRetry" not in first.plain and "Retrying" not in first.plain  # no Prefect retries of bad files
    counter = OpenCounter(inbox, monkeypatch)
    second = invoke(*args)
    assert second.exit_code == 0, second.plain
    assert "6 known bad (unchanged)" in second.plain and "Beginning flow run" not in second.plain
    assert counter.opened == []  # not read again
    monkeypatch.undo()
    (inbox / "text.tif").write_bytes(b"still not a tiff, but changed\n")  # a changed file is tried again
    _age(inbox / "text.tif", 300)
    third = invoke(*args[:-2], "--max-voxels", "100000", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert third.exit_code == 1, third.plain  # text.tif fails again; large.tif fits the larger limit now
    assert f"failed: {inbox / 'text.tif'}" in third.plain and f"failed: {inbox / 'large.tif'}" not in third.plain
    assert "1 new volumes ingested" in third.plain and "4 known bad (unchanged)" in third.plain
