"""Shared test set-up: isolated Prefect/MLflow homes and the optional real-data folder."""
from __future__ import annotations

import os
import tempfile
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


# The slowest test files (seconds on the 2-core CI machine, from pytest --durations), run first: `make test` hands
# whole files to two workers in collection order (`--no-loadscope-reorder`: pytest-xdist would otherwise put the
# files with the most tests first), so a slow file collected last would run alone at the end.
SLOW_FILES_FIRST = (
    "tests/flows/test_cli.py",  # ~230 s
    "tests/flows/test_segment_crash.py",  # ~200 s
    "tests/flows/test_flows.py",  # ~120 s
    "tests/stack/test_stack.py",  # ~110 s (a real Prefect server, Dask scheduler and MLflow server)
    "tests/flows/test_resume.py",  # ~110 s
    "tests/unet/test_train.py",  # ~100 s
    "tests/flows/test_real_data.py",  # ~90 s
    "tests/flows/test_recipes.py",  # ~90 s
    "tests/flows/test_demo.py",  # ~60 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow files first (stable: every file's tests stay together and in their order)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
