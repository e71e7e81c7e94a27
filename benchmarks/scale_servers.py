"""The servers ``benchmarks/scale.py`` measures against: a PostgreSQL server run as the postgres user, a real
``prefect server`` on SQLite or PostgreSQL, and the rows and bytes its database holds."""
from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
ROW_TABLES = ("flow_run", "task_run", "task_run_state", "log", "events", "event_resources")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s")


@contextlib.contextmanager
def postgres(root: Path):
    """A PostgreSQL server run as the postgres user (see /work/shared/STACK.md); yields its host:port."""
    pg_bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
    as_pg = ["runuser", "-u", "postgres", "--"]
    folder = root / "pg"
    folder.mkdir()
    os.chmod(root, 0o755)
    shutil.chown(folder, "postgres")
    port = free_port()
    run = lambda *a: subprocess.run([*as_pg, *a], check=True, capture_output=True, timeout=300)  # noqa: E731
    run(str(pg_bin / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "octseg")
    run(str(pg_bin / "pg_ctl"), "-D", str(folder / "data"), "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
        "-l", str(folder / "log"), "-w", "start")
    try:
        run(str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "octseg", "prefect")
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*as_pg, str(pg_bin / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=300)


@contextlib.contextmanager
def prefect_server(root: Path, kind: str):
    """A ``prefect server`` on 127.0.0.1 with its database in SQLite or PostgreSQL; yields (api url, db url)."""
    with contextlib.ExitStack() as stack:
        if kind == "postgres":
            db = f"postgresql+asyncpg://octseg@{stack.enter_context(postgres(root))}/prefect"
        else:
            db = f"sqlite+aiosqlite:///{root / 'prefect.db'}"
        port = free_port()
        env = {**clean_env(root), "PREFECT_API_DATABASE_CONNECTION_URL": db}
        log = (root / f"prefect-{kind}.log").open("w")
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/api/health", proc)
            yield f"http://127.0.0.1:{port}/api", db
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(60)


def run_child(cmd: list[str], env: dict[str, str], what: str) -> dict:
    """Run a measuring child process: its ``[...]`` progress lines printed as they come, its ``RESULT {json}``
    line returned; a failure raises with the last lines it printed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result, tail = None, collections.deque(maxlen=60)
    for line in proc.stdout:
        tail.append(line.rstrip())
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif line.startswith("["):
            print(line.rstrip(), flush=True)
    if proc.wait() != 0 or result is None:
        print("\n".join(tail), file=sys.stderr)
        raise RuntimeError(f"{what} failed (exit {proc.returncode})")
    return result


def clean_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DASK_"))}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", OCTSEG_PROGRESS="0", MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db")
    return env


def db_stats(db: str) -> dict[str, int]:
    """The Prefect database's size in bytes and the rows of its busiest tables."""
    if db.startswith("sqlite"):
        import sqlite3

        path = db.split("///", 1)[1]
        size = sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)) as conn:
            rows = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ROW_TABLES}
        return {"bytes": size, **rows}
    import psycopg2

    with contextlib.closing(psycopg2.connect(db.replace("postgresql+asyncpg", "postgresql"))) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_database_size('prefect')")
        size = cur.fetchone()[0]
        rows = {}
        for t in ROW_TABLES:
            cur.execute(f"SELECT COUNT(*) FROM {t}")
            rows[t] = cur.fetchone()[0]
    return {"bytes": size, **rows}


def growth(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    """Per 1,000 volumes."""
    return {k: round((after[k] - before[k]) * 1000 / n, 1) for k in after}


# ---- what the server recorded ----

def api_latency(api: str, flow_run_id: str) -> dict[str, float]:
    """Median ms of the calls the UI's flow-run page makes (5 rounds)."""
    body = lambda d: json.dumps(d).encode()  # noqa: E731
    flow_filter = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    calls = {
        "flow_run": ("GET", f"/flow_runs/{flow_run_id}", None),
        "task_runs_page": ("POST", "/task_runs/filter", body({**flow_filter, "sort": "EXPECTED_START_TIME_DESC",
                                                              "limit": 200, "offset": 0})),
        "task_runs_count": ("POST", "/task_runs/count", body(flow_filter)),
        "run_graph": ("GET", f"/flow_runs/{flow_run_id}/graph-v2", None),
        "logs_page": ("POST", "/logs/filter", body({"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                    "sort": "TIMESTAMP_ASC", "limit": 200, "offset": 0})),
    }
    out = {}
    for name, (method, path, data) in calls.items():
        times = []
        for _ in range(5):
            request = urllib.request.Request(api + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(request, timeout=300) as r:
                r.read()
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1000, 1)
    return out


def recorded_lag(api: str, flow_run_id: str, expected: int, ended: float) -> float:
    """Seconds after the flow ended until the server lists ``expected`` final task runs of the flow run."""
    data = json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}},
                       "task_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED"]}}}}).encode()
    while True:
        request = urllib.request.Request(api + "/task_runs/count", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            if int(r.read()) >= expected or time.perf_counter() - ended > 600:
                return round(time.perf_counter() - ended, 2)
        time.sleep(0.5)
