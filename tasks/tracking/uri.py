"""MLflow 3 at the edge: where tracking goes (the URI, the experiment); registered models are :mod:`octseg.tasks.tracking.models`.

Plain functions; ``mlflow`` and ``torch`` are imported inside them so that ``octseg --help`` stays fast.
Every function takes the tracking URI explicitly (:func:`resolve_tracking_uri` picks the default once,
in the flow) and uses an ``MlflowClient`` bound to it. Only the fluent calls of a training run need
MLflow's process-global URI; :func:`using_tracking_uri` sets it for their duration and restores it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "check_tracking_uri",
    "client",
    "ensure_experiment",
    "resolve_tracking_uri",
    "sqlite_path",
    "using_tracking_uri",
]

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlflow.db``."""
    if uri:
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_metrics``, ...) at ``uri`` for a block.

    ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI``; both are restored on exit
    (``set_tracking_uri(None)`` unsets them when nothing was set before).
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")  # what set_tracking_uri writes; None: unset again
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def client(tracking_uri: str):
    """An ``MlflowClient`` bound to ``tracking_uri`` (tracking and registry both)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def sqlite_path(tracking_uri: str) -> str | None:
    """The database path of a ``sqlite:///`` URI (query string dropped), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]


def _artifact_root(tracking_uri: str) -> str | None:
    """Artifact root beside a SQLite database (``<db dir>/mlartifacts``); None: the store decides."""
    if not tracking_uri.startswith("sqlite:"):
        if tracking_uri.startswith(("postgresql", "mysql", "mssql")):
            log.warning("%s: experiments get MLflow's default artifact location (./mlruns)", tracking_uri)
        return None  # http(s): the server decides; file stores keep artifacts inside the store
    path = sqlite_path(tracking_uri)
    if path in (None, "", ":memory:"):
        raise ValueError(f"need a SQLite file URI like sqlite:////abs/path/mlflow.db, got {tracking_uri!r}")
    return (Path(path).resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing with its artifacts beside a SQLite database."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        root = _artifact_root(tracking_uri)
        location = f"{root}/{name}" if root else None
        try:
            return mlflow_client.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # created concurrently by another process
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
            log.debug("experiment %r appeared while creating it: %s", name, e)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"experiment {name!r} in {tracking_uri} is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or use another name"
        )
    return experiment.experiment_id




def check_tracking_uri(tracking_uri: str, must_exist: bool = False) -> None:
    """ValueError (one line) when a ``sqlite:///`` URI cannot be a database MLflow can use.

    Checked without importing MLflow: the path is a SQLite file (its first 16 bytes), or absent with a
    folder to create it in (``must_exist=False``). Other URIs (``http(s)://``, Postgres) are left to MLflow.
    """
    if tracking_uri.startswith("sqlite:") and not tracking_uri.startswith("sqlite:///"):
        raise ValueError(f"tracking URI {tracking_uri!r}: a SQLite URI looks like sqlite:////abs/path/mlflow.db")
    path = sqlite_path(tracking_uri)
    if path is None or path == ":memory:":
        return
    db = Path(path)
    if db.is_dir():
        raise ValueError(f"tracking URI {tracking_uri}: {db} is a folder, not a SQLite database")
    if db.exists():
        try:
            with db.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise ValueError(f"tracking URI {tracking_uri}: cannot read {db} ({e.strerror})") from None
        if head and head != SQLITE_MAGIC:  # an empty file is what sqlite itself creates first
            raise ValueError(f"tracking URI {tracking_uri}: {db} is not a SQLite database")
        return
    if must_exist:
        raise ValueError(f"no MLflow database at {tracking_uri}; run `octseg train` first or pass --tracking-uri")
    parent = db.parent
    if not parent.is_dir():
        raise ValueError(f"tracking URI {tracking_uri}: folder {parent} does not exist")
