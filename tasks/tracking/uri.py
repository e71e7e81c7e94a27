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
    "PROBE_SECONDS",
    "TRACKING_SCHEMES",
    "check_tracking_uri",
    "client",
    "ensure_experiment",
    "probe_tracking_server",
    "resolve_tracking_uri",
    "sqlite_path",
    "tracking_scheme",
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




# Schemes MLflow 3 tracks to without plug-ins (a plug-in adds its own through the entry points
# ``mlflow.tracking_store``); a database scheme may name its driver (``postgresql+psycopg2``).
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "uc")
PROBE_SECONDS = 3.0  # how long the connection probe of an http(s) tracking server waits


def _plugin_schemes() -> set[str]:
    from importlib.metadata import entry_points

    try:
        return {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # noqa: BLE001 - broken package metadata must not stop the command
        return set()


def tracking_scheme(tracking_uri: str) -> str:
    """The URI's scheme, lower case, without a database driver; ``file`` for a plain path (``C:`` included)."""
    head, sep, _ = tracking_uri.partition(":")
    if not sep or len(head) == 1 or "/" in head or "\\" in head:
        return "file"
    return head.lower().split("+", 1)[0]


def check_tracking_uri(tracking_uri: str, must_exist: bool = False) -> None:
    """ValueError (one line) when the tracking URI cannot work, found in seconds, before any flow starts.

    Without importing MLflow: the scheme is one MLflow tracks to (or a plug-in registers); a ``sqlite:///``
    path is a SQLite file that is MLflow's (or empty of tables), or absent with a folder to create it in
    (``must_exist=False``); an empty file is not a database; a folder store only with
    ``MLFLOW_ALLOW_FILE_STORE`` (MLflow 3 refuses it otherwise); an ``http(s)://`` server answers a GET of ``/health`` within :data:`PROBE_SECONDS`. Other
    URIs (Postgres, MySQL, ...) are left to MLflow.
    """
    scheme = tracking_scheme(tracking_uri)
    if scheme not in TRACKING_SCHEMES and scheme not in _plugin_schemes():
        raise ValueError(f"tracking URI {tracking_uri!r}: unsupported scheme {scheme!r}; MLflow tracks to "
                         f"sqlite:////abs/path/mlflow.db, http(s)://host:port, postgresql://, mysql://, mssql:// or a "
                         f"local folder")
    if scheme in ("http", "https"):
        probe_tracking_server(tracking_uri)
        return
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise ValueError(f"tracking URI {tracking_uri!r}: MLflow 3 keeps its folder store in maintenance mode and "
                         f"refuses it; use sqlite:////abs/path/mlflow.db (or an MLflow server), or set "
                         f"MLFLOW_ALLOW_FILE_STORE=true")
    if tracking_uri.startswith("sqlite:") and not tracking_uri.startswith("sqlite:///"):
        raise ValueError(f"tracking URI {tracking_uri!r}: a SQLite URI looks like sqlite:////abs/path/mlflow.db")
    path = sqlite_path(tracking_uri)
    if path is None or path == ":memory:":
        return
    db = Path(path)
    if db.is_dir():
        raise ValueError(f"tracking URI {tracking_uri}: {db} is a folder, not a SQLite database")
    if db.exists():
        _check_sqlite_file(tracking_uri, db)
    elif must_exist:
        raise ValueError(f"no MLflow database at {tracking_uri}; run `octseg train` first or pass --tracking-uri")
    elif not db.parent.is_dir():
        raise ValueError(f"tracking URI {tracking_uri}: folder {db.parent} does not exist")


def _check_sqlite_file(tracking_uri: str, db: Path) -> None:
    """An existing database file: SQLite (its first 16 bytes), not empty, and MLflow's or without tables."""
    import time

    for _ in range(20):  # a database another command is creating this very moment gets its header at once
        try:
            with db.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise ValueError(f"tracking URI {tracking_uri}: cannot read {db} ({e.strerror})") from None
        if head or time.time() - db.stat().st_mtime > 10:
            break
        time.sleep(0.1)
    if not head:
        raise ValueError(f"tracking URI {tracking_uri}: {db} is an empty file, not an MLflow database; remove it "
                         f"(MLflow creates the database there) or point --tracking-uri at the right file")
    if head != SQLITE_MAGIC:
        raise ValueError(f"tracking URI {tracking_uri}: {db} is not a SQLite database")
    tables = _sqlite_tables(db)
    if tables and not {"experiments", "alembic_version"} & set(tables):
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise ValueError(f"tracking URI {tracking_uri}: {db} is a SQLite database but not MLflow's (tables: {listed})")


def _sqlite_tables(db: Path) -> list[str]:
    """The tables of a SQLite file, read-only; [] when it cannot be asked (locked: MLflow will say more)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=2)
        try:
            return [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        if "not a database" in str(e) or "malformed" in str(e):
            raise ValueError(f"{db}: a damaged SQLite database ({e})") from None
        return []


def probe_tracking_server(tracking_uri: str, timeout: float = PROBE_SECONDS) -> None:
    """ValueError unless an HTTP server answers at ``tracking_uri`` within ``timeout`` seconds (a GET of its
    ``/health``, MLflow's liveness endpoint). Any answer will do but a proxy's 502/503/504 (nothing behind
    it) and MLflow's 403 "Invalid Host header"; refused connections, timeouts and unknown hosts are errors.
    Name resolution runs in a thread, so an unreachable DNS server costs ``timeout`` too, not minutes."""
    import threading
    import urllib.error
    import urllib.request

    url = tracking_uri.split("?", 1)[0].split("#", 1)[0].rstrip("/") + "/health"
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "octseg"}),
                                        timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError as e:
            body = e.read(512).decode("utf-8", "replace") if e.fp is not None else ""
            if e.code in (502, 503, 504):
                outcome.append(f"the server answers {e.code} {e.reason} (no MLflow server behind it?)")
            elif e.code == 403 and "host header" in body.lower():
                outcome.append("the MLflow server refuses this host name (start it with --allowed-hosts, or set "
                               "MLFLOW_SERVER_ALLOWED_HOSTS)")
            else:
                outcome.append(None)  # it answers: MLflow will say what is wrong, if anything
        except urllib.error.URLError as e:
            reason = e.reason
            if "CERTIFICATE_VERIFY_FAILED" in str(reason):
                outcome.append(None)  # someone answers; MLflow checks TLS with its own settings
            else:
                outcome.append(f"no server answers ({getattr(reason, 'strerror', None) or reason})")
        except (OSError, ValueError) as e:  # a timeout, a reset connection, a malformed URL
            outcome.append(f"no server answers ({type(e).__name__}: {e or 'timed out'})")

    worker = threading.Thread(target=ask, name="octseg-tracking-probe", daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    problem = outcome[0] if outcome else f"no answer within {timeout:.0f} s"
    if problem:
        raise ValueError(f"tracking URI {tracking_uri}: {problem}; start the MLflow server or fix --tracking-uri / "
                         f"MLFLOW_TRACKING_URI")
