"""Shared test set-up: isolated Prefect/MLflow homes and the optional real-data folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Must happen before prefect or mlflow is imported anywhere in the test session.
_TMP = Path(tempfile.mkdtemp(prefix="octseg-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_TMP / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_TMP / 'mlflow.db'}")
if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two pytest-xdist workers: a home each
    os.environ["PREFECT_HOME"] = str(Path(os.environ["PREFECT_HOME"]) / worker)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real OCT/EM images beside the project; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Callable[[Path], Path]:
    """Makes a fresh PREFECT_HOME for a command run in a subprocess, holding a copy of a Prefect database migrated
    once per test worker: each ephemeral server then starts in ~9 s instead of ~25 s of migrations. Tests that
    are about a first start on an empty home do not use it."""
    template = tmp_path_factory.mktemp("prefect-template")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(template)
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"Prefect's migrations failed: {(done.stdout + done.stderr)[-3000:]}"
    database = template / "prefect.db"
    assert database.is_file(), f"no Prefect database made in {template}"
    assert not (template / "prefect.db-wal").exists(), "the template database is not closed: a copy could be torn"

    def make(home: Path) -> Path:
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "prefect.db").exists():
            shutil.copyfile(database, home / "prefect.db")
        return home
    return make


# The slowest test files run first: `make test` hands
# whole files to two workers in collection order (`--no-loadscope-reorder`: pytest-xdist would otherwise put the
# files with the most tests first), so a slow file collected last would run alone at the end.
SLOW_FILES_FIRST = (  # seconds a file, from `make test PYTEST_ARGS=--durations=0` on a fresh clone (2 workers)
    "tests/flows/test_segment_crash.py",  # ~410 s (two tests then, one now)
    "tests/stack/test_stack.py",  # ~305 s (a real Prefect server, Dask scheduler and MLflow server)
    "tests/flows/test_cli.py",  # ~255 s
    "tests/flows/test_flows.py",  # ~200 s
    "tests/flows/test_recipes.py",  # ~120 s
    "tests/flows/test_resume.py",  # ~110 s
    "tests/flows/test_real_data.py",  # ~110 s
    "tests/flows/test_demo.py",  # ~75 s
    "tests/flows/test_crossval.py",  # ~70 s
    "tests/flows/test_watch.py",  # ~65 s
    "tests/tasks/runtime/test_tether.py",  # ~65 s
    "tests/unet/test_train.py",  # ~55 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow files first (stable: every file's tests stay together and in their order)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
