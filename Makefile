# octseg — two commands on a fresh machine:
#   make demo   builds .venv and runs the whole pipeline on synthetic phantoms (embedded defaults)
#   make test   builds .venv and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.octseg-installed
WORK   ?= octseg-demo
PYTEST_ARGS ?=
# two pytest-xdist workers, one test file each at a time (module fixtures run once); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2

# Keep Prefect, MLflow and temp files of the tests out of the home directory.
TEST_TMP := $(shell mktemp -d 2>/dev/null || echo /tmp/octseg-tests)
TEST_ENV := PREFECT_HOME=$(TEST_TMP)/prefect \
	PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
	MLFLOW_DISABLE_TELEMETRY=true \
	MLFLOW_TRACKING_URI=sqlite:///$(TEST_TMP)/mlflow.db

.PHONY: venv test lint demo bench clean postgres

venv: $(STAMP)

# torch first: 2.13.0 is a local CPU wheel; the lock keeps everything else from pulling a CUDA build.
# uv installs the same lock in ~30 s instead of pip's ~4 min (benchmarks/install.sh); it reads pip's find-links
# (where the local torch wheel lies). Where uv cannot be installed or fails, pip does the same install
# (INSTALLER=pip: pip only).
INSTALLER ?= uv
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	@links="$$($(BIN)/pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | tr ' ' '\n' | sort -u \
		| sed 's/^/--find-links /')"; uv="env VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip install --quiet $$links"; \
	{ [ "$(INSTALLER)" = uv ] && $(PIP) uv==0.13.10 2>/dev/null && $$uv torch==2.13.0 && $$uv -r requirements.lock && $$uv --no-deps -e . \
		&& echo "installed with uv"; } || { echo "installing with pip"; \
		$(PIP) torch==2.13.0 && $(PIP) -r requirements.lock && $(PIP) --no-deps -e .; }
	touch $@

test: $(STAMP) postgres
	$(TEST_ENV) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# the stack test (tests/stack) runs a real PostgreSQL: Debian's package, installed when missing (as root)
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "PostgreSQL is missing and cannot be installed here: the stack test will skip"; }

lint: $(STAMP)
	$(BIN)/ruff check --select F,E9 unet tasks flows tests benchmarks

# the command itself allows the ephemeral Prefect server a generous first start and keeps logs quiet
demo: $(STAMP)
	$(BIN)/octseg demo --workdir $(WORK)

bench: $(STAMP)
	$(BIN)/python benchmarks/weights.py
	$(BIN)/python benchmarks/startup.py

clean:
	rm -rf $(VENV) $(WORK) .pytest_cache
