"""Flow tests run against a real (temporary) Prefect server via ``prefect_test_harness``."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def prefect_logging_outside_the_runner(prefect_server) -> None:
    """Prefect binds its console handler to the ``sys.stderr`` of the moment it first sets up logging;
    done inside ``CliRunner.invoke`` that is the runner's stream, closed after the call, and every later
    log line prints a '--- Logging error ---' traceback into the next command's output."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
