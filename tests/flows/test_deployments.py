"""deployments/prefect.yaml against a real Prefect server (the session's test server): `prefect deploy
--all` creates every deployment with its schedule, concurrency limit and typed parameters, from a
working directory that is not the repository."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"


def _prefect(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_prefect_deploy_all_creates_the_scheduled_deployments(tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from octseg.flows.config import SegmentConfig, TrainFlowConfig, WatchConfig

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OCTSEG_ARCHIVE": str(tmp_path / "a.zarr"),
           "OCTSEG_INBOX": str(tmp_path / "inbox"), "OCTSEG_HOME": str(tmp_path)}
    for pool, kind in (("octseg", "process"), ("octseg-docker", "docker")):
        done = _prefect("work-pool", "create", pool, "--type", kind, env=env, cwd=tmp_path)
        assert done.returncode == 0 or "already exists" in done.stdout + done.stderr, done.stdout + done.stderr
    done = _prefect("work-queue", "create", "archive", "--pool", "octseg", "--limit", "1", env=env, cwd=tmp_path)
    assert done.returncode == 0 or "already exists" in done.stdout + done.stderr, done.stdout + done.stderr
    done = _prefect("deploy", "--all", "--prefect-file", str(PREFECT_FILE), env=env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    expected = {d["name"] for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]}
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
    assert expected <= set(deployments)
    hourly = deployments["watch-inbox-hourly"]
    assert [s.schedule.cron for s in hourly.schedules] == ["0 * * * *"] and hourly.schedules[0].active
    assert [s.schedule.cron for s in deployments["resegment-nightly"].schedules] == ["30 1 * * *"]
    assert [s.schedule.cron for s in deployments["train-weekly"].schedules] == ["0 3 * * 0"]
    assert deployments["segment"].schedules == []  # the manual twin
    for name in ("watch-inbox-hourly", "resegment-nightly", "train-weekly"):
        limit = deployments[name].global_concurrency_limit
        assert limit is not None and limit.limit == 1, name
    # the parameters are the flows' typed configs, with the deploying machine's paths filled in
    watch = WatchConfig(**hourly.parameters["config"])
    assert watch.archive == tmp_path / "a.zarr" and watch.inbox == tmp_path / "inbox" and watch.settle_seconds == 120
    SegmentConfig(**deployments["resegment-nightly"].parameters["config"])
    TrainFlowConfig(**deployments["train-weekly"].parameters["config"])
    # nothing of the deploying machine's working directory: the pull step goes to OCTSEG_HOME
    assert hourly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}]
    assert hourly.work_pool_name == "octseg" and deployments["watch-inbox-hourly-docker"].work_pool_name == "octseg-docker"
    # everything that writes into the archive goes through one work queue that runs one flow at a time
    writers = {"watch-inbox-hourly", "resegment-nightly", "watch", "segment", "preprocess"}
    assert {n for n, d in deployments.items() if d.work_queue_name == "archive"} >= writers
    with get_client(sync_client=True) as client:
        assert client.read_work_queue_by_name("archive", work_pool_name="octseg").concurrency_limit == 1
