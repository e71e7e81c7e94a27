"""Flow tests run against a real (temporary) Prefect server via ``prefect_test_harness``."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
