"""An unfinished training, continued: every epoch the run's ``checkpoint/last.pt`` is replaced, and a rerun
with the same fingerprint (or ``--resume RUN_ID``) picks the run up from it.

A run is being trained while its process lives (same machine: :func:`~octseg.tasks.runtime.processes.process_gone`)
or, on another machine, while its heartbeat tag is younger than :data:`STALE_SECONDS`.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from octseg.tasks.runtime.processes import process_gone
from octseg.tasks.tracking.uri import client

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FILE", "STALE_SECONDS", "save_checkpoint", "unfinished_run"]

CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "last.pt"


def save_checkpoint(state: dict[str, Any]) -> None:
    """Replace the active run's ``checkpoint/last.pt`` with ``state`` (see ``octseg.unet.train.fit``) and
    renew the run's heartbeat: which process trains it, and when it last saved."""
    import tempfile

    import mlflow
    import torch

    with tempfile.TemporaryDirectory(prefix="octseg-checkpoint-") as tmp:
        path = Path(tmp) / CHECKPOINT_FILE
        torch.save(state, path)
        mlflow.log_artifact(str(path), CHECKPOINT_DIR)
    mlflow.set_tags({"octseg.host": socket.gethostname(), "octseg.pid": str(os.getpid()),
                     "octseg.heartbeat": f"{time.time():.0f}"})


STALE_SECONDS = 3600  # a RUNNING run on another machine without a checkpoint for this long is abandoned


def _abandoned(run) -> bool:
    """True when an unfinished run is not being trained any more: FAILED/KILLED, or RUNNING but its
    process is gone (same machine) or silent for ``STALE_SECONDS`` (another machine)."""
    if run.info.status != "RUNNING":
        return True
    tags = run.data.tags
    if tags.get("octseg.host") == socket.gethostname() and tags.get("octseg.pid", "").isdigit():
        return process_gone({"host": tags["octseg.host"], "pid": int(tags["octseg.pid"])})
    return time.time() - float(tags.get("octseg.heartbeat", 0)) > STALE_SECONDS


def _load_checkpoint(tracking_uri: str, run_id: str) -> dict[str, Any] | None:
    import tempfile

    import mlflow
    import torch

    with tempfile.TemporaryDirectory(prefix="octseg-checkpoint-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}",
                                                       dst_path=tmp, tracking_uri=tracking_uri)
        except Exception:  # no checkpoint yet (killed before the first epoch ended)
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def unfinished_run(tracking_uri: str, experiment_id: str, fingerprint: str,
                   run_id: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """(run id, checkpoint) to continue: ``run_id`` when given (ValueError unless it trained on the same
    data and settings and has a checkpoint), else the newest unfinished run with this fingerprint that
    has one; (None, None) when there is nothing to continue."""
    mlflow_client = client(tracking_uri)
    if run_id is not None:
        try:
            run = mlflow_client.get_run(run_id)
        except Exception as e:
            raise ValueError(f"no run {run_id} in {tracking_uri} to resume ({type(e).__name__})") from None
        if run.info.status == "FINISHED":
            raise ValueError(f"run {run_id} finished; there is nothing to resume (train with --force for a new run)")
        if run.data.tags.get("octseg.fingerprint") != fingerprint:
            raise ValueError(f"run {run_id} trained on other data or settings; resume it with the same "
                             "archive, volumes and options (see its params in the MLflow UI)")
        state = _load_checkpoint(tracking_uri, run_id)
        if state is None:
            raise ValueError(f"run {run_id} has no checkpoint to resume from")
        return run_id, state
    runs = mlflow_client.search_runs([experiment_id], f"tags.`octseg.fingerprint` = '{fingerprint}' and "
                                     "attributes.status != 'FINISHED'", order_by=["attributes.start_time DESC"])
    for run in runs:
        if not _abandoned(run):  # another process is training it right now
            continue
        state = _load_checkpoint(tracking_uri, run.info.run_id)
        if state is not None:
            return run.info.run_id, state
    return None, None
