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
# uv installs the same lock ~15x faster than pip (benchmarks/install.sh), from the places pip is configured to use
# (pip's find-links hold the local torch wheel), every index weighed alike as pip does, and compiles the bytecode
# as pip does (where PYTHONDONTWRITEBYTECODE is set, as on CI, Python would otherwise compile torch, Prefect and
# MLflow again in every process). Where uv cannot be installed or fails, pip does the same install
# (INSTALLER=pip: pip only).
INSTALLER ?= uv
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
define UV_SOURCES
import ast, os, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
args = []
for line in out.splitlines():
    key, _, value = line.partition("=")
    option = key.rsplit(".", 1)[-1]
    if option in ("find-links", "index-url", "extra-index-url"):
        for place in ast.literal_eval(value).split():
            path = place[len("file://"):] if place.startswith("file://") else None if "://" in place else place
            if path is None or os.path.exists(path):
                args.append(f"--{option}={place}")
print(" ".join(dict.fromkeys(args)))
endef
export UV_SOURCES
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	@uv="env VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv pip install --quiet --compile-bytecode --index-strategy unsafe-best-match \
		$$($(BIN)/python -c "$$UV_SOURCES")"; \
	{ [ "$(INSTALLER)" = uv ] && { $(PIP) uv==0.13.10 2>/dev/null || { echo "uv could not be installed"; false; }; } \
		&& $$uv torch==2.13.0 && $$uv -r requirements.lock && $$uv --no-deps -e . && echo "installed with uv"; } \
	|| { echo "installing with pip"; $(PIP) torch==2.13.0 && $(PIP) -r requirements.lock && $(PIP) --no-deps -e .; }
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
