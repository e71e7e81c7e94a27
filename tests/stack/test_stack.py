"""octseg as a service, on real servers on 127.0.0.1: PostgreSQL, `prefect server` on Postgres,
`mlflow server` on Postgres with an artifacts folder, `dask scheduler` with two `dask worker`
processes, `prefect deploy --all` from deployments/prefect.yaml and a process worker. A tiny training
run registers the champion in the MLflow server; the drop-folder deployment is triggered on phantom
files and must complete in the Prefect server with its volumes segmented on the Dask workers; a broken
file makes the next run Failed; the cron deployments have scheduled runs. Every process is started
here on a free port and stopped by its own PID; the temporary folders go with them.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))

pytestmark = pytest.mark.skipif(not PG_BIN or os.geteuid() != 0 or shutil.which("runuser") is None,
                                reason="needs PostgreSQL's binaries (make postgres) and root to run them as postgres")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s: {log.read_text()[-3000:]}")


class Stack:
    """The servers of one test, each started in its own process group and stopped by its PID."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DASK_"))}
        self.env.update(PREFECT_HOME=str(root / "prefect-home"), OCTSEG_PROGRESS="0",
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true")

    def start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(args, env={**self.env, **(env or {})}, cwd=self.root, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def run(self, args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        done = subprocess.run(args, env={**self.env, **env}, cwd=self.root, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, (args, (done.stdout + done.stderr)[-3000:])
        return done

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture
def stack():
    root = Path(tempfile.mkdtemp(prefix="octseg-stack-"))
    os.chmod(root, 0o755)  # the postgres user must reach its data folder
    s = Stack(root)
    pg = root / "pg"
    pg.mkdir()
    shutil.chown(pg, "postgres")
    pg_bin, pg_port = Path(PG_BIN[-1]), _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    try:
        s.run([*as_pg, str(pg_bin / "initdb"), "-D", str(pg / "data"), "-A", "trust", "-U", "octseg"])
        s.run([*as_pg, str(pg_bin / "pg_ctl"), "-D", str(pg / "data"), "-o",
               f"-p {pg_port} -k {pg} -c listen_addresses=127.0.0.1", "-l", str(pg / "log"), "-w", "start"])
        for db in ("prefect", "mlflow"):
            s.run([*as_pg, str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "octseg", db])
        s.pg = f"octseg@127.0.0.1:{pg_port}"
        yield s
    finally:
        s.stop()
        subprocess.run([*as_pg, str(pg_bin / "pg_ctl"), "-D", str(pg / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _age(path: Path) -> None:
    then = time.time() - 600
    os.utime(path, (then, then))


def test_drop_folder_deployment_on_real_servers(stack: Stack) -> None:
    from octseg.tasks.synthetic.phantom import write_phantom_files

    root = stack.root
    prefect_port, mlflow_port, dask_port = _free_port(), _free_port(), _free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    tracking = f"http://127.0.0.1:{mlflow_port}"
    scheduler = f"tcp://127.0.0.1:{dask_port}"
    server = stack.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                            str(prefect_port)],
                         {"PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{stack.pg}/prefect",
                          "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"})
    mlflow = stack.start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                    "--backend-store-uri", f"postgresql+psycopg2://{stack.pg}/mlflow",
                                    "--artifacts-destination", str(root / "mlartifacts"), "--workers", "1"])
    dask_s = stack.start("dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                            str(dask_port), "--no-dashboard"])
    stack.start("dask-workers", [str(BIN / "dask"), "worker", scheduler, "--nworkers", "2", "--nthreads", "1",
                                 "--no-dashboard", "--local-directory", str(root / "dask")])
    _wait_http(f"{api}/health", server, 240, root / "prefect-server.log")
    _wait_http(f"{tracking}/health", mlflow, 240, root / "mlflow.log")
    assert dask_s.poll() is None
    services = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking, "DASK_SCHEDULER_ADDRESS": scheduler}
    stack.env.update(services)

    # a tiny champion in the MLflow server, trained on annotated phantoms
    archive, inbox = root / "data" / "archive.zarr", root / "data" / "inbox"
    train_files = write_phantom_files(root / "train", n_volumes=2, n_bscans=3, height=48, width=64)
    octseg = [str(BIN / "octseg")]
    stack.run([*octseg, "ingest", *map(str, train_files), "--labels", str(root / "train" / "labels"),
               "--archive", str(archive)])
    stack.run([*octseg, "train", "--archive", str(archive), "--epochs", "1", "--base-channels", "4", "--depth", "2",
               "--tiles-per-epoch", "4", "--optimizer", "adam", "--lr", "0.001", "--device", "cpu"])

    # the deployments, and a process worker that runs them with the servers' addresses in its environment
    deploy_env = {"OCTSEG_ARCHIVE": str(archive), "OCTSEG_INBOX": str(inbox), "OCTSEG_HOME": str(root / "data")}
    stack.run([str(BIN / "prefect"), "work-pool", "create", "octseg", "--type", "process"])
    stack.run([str(BIN / "prefect"), "work-pool", "create", "octseg-docker", "--type", "docker"])
    stack.run([str(BIN / "prefect"), "work-queue", "create", "archive", "--pool", "octseg", "--limit", "1"])
    stack.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
               str(ROOT / "deployments" / "prefect.yaml")], **deploy_env)
    stack.start("prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", "octseg", "--type", "process"],
                {"PREFECT_WORKER_QUERY_SECONDS": "2"})  # picks a triggered run up within 2 s, not 10

    for f in write_phantom_files(inbox, n_volumes=2, n_bscans=3, height=48, width=64, seed=10):
        _age(f.rename(f.with_name(f.name.replace("phantom", "scan"))))
    shutil.rmtree(inbox / "labels")
    run_id = _trigger(stack, "watch-inbox/watch")
    state = _wait_for_run(api, run_id)
    assert state.type.value == "COMPLETED", (state, (root / "prefect-worker.log").read_text()[-3000:])

    from distributed import Client
    from mlflow.tracking import MlflowClient

    from octseg.tasks.archive.store import open_archive
    from octseg.tasks.segmentation.segment import PROGRESS_TOPIC

    arc = open_archive(archive, create=False)
    new = [v for v in arc.volume_ids() if v.startswith("scan")]
    assert sorted(new) == ["scan_000", "scan_001"]
    assert all(arc.prediction(v) is not None for v in new)
    with Client(scheduler, timeout=30) as client:  # the volumes were segmented on the Dask workers
        volumes = {event[1]["volume"] for event in client.get_events(PROGRESS_TOPIC)}
    assert set(new) <= volumes
    champion = MlflowClient(tracking).get_model_version_by_alias("octseg-unet", "champion")
    assert arc.prediction_info(new[0])["model_version"] == champion.version

    # a broken file: its task run fails, so does the flow run, in the server
    (inbox / "broken.tif").write_bytes(b"not a tiff")
    _age(inbox / "broken.tif")
    state = _wait_for_run(api, _trigger(stack, "watch-inbox/watch"))
    assert state.type.value == "FAILED" and "broken.tif" in (state.message or ""), state

    # the cron deployments have runs scheduled by the server
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):  # this server, whatever the session's settings
        with get_client(sync_client=True) as client:
            for name in ("watch-inbox-hourly", "resegment-nightly", "train-weekly"):
                deadline = time.monotonic() + 60
                while True:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=[name])))
                    if any(r.state and r.state.type.value == "SCHEDULED" for r in runs) or time.monotonic() > deadline:
                        break
                    time.sleep(2)
                assert any(r.state and r.state.type.value == "SCHEDULED" for r in runs), name


def _trigger(stack: Stack, deployment: str) -> str:
    done = stack.run([str(BIN / "prefect"), "deployment", "run", deployment])
    line = next(x for x in done.stdout.splitlines() if "UUID" in x)
    return line.split()[-1]


def _wait_for_run(api: str, run_id: str, timeout: float = 400):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state
            time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout} s")
