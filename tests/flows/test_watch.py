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
