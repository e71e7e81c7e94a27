"""Benchmark: the fixed cost of an ``octseg`` command, as ratios against a bare ``python -c pass``
measured in the same run (machines here are noisy; no timed assertions anywhere).

Prints, for each case, the median wall time of N runs and its ratio to the bare interpreter:

- ``--help``: the CLI module only (no torch, mlflow, prefect);
- a user error (missing archive): answered by the pre-flight checks, before Prefect;
- a command with nothing to do (``preprocess`` of an up-to-date archive): no flow run is started;
- the same command forced through a flow run (Prefect's ephemeral server): what the no-op path saves.

    .venv/bin/python benchmarks/startup.py [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time(cmd: list[str], env: dict[str, str], cwd: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    octseg = [sys.executable, "-m", "octseg.flows.cli"]
    with tempfile.TemporaryDirectory(prefix="octseg-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "OCTSEG_PROGRESS": "0",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        from octseg.tasks.synthetic.phantom import write_phantom_files

        sources = write_phantom_files(work / "scans", n_volumes=2, n_bscans=4, height=64, width=96)
        archive = str(work / "a.zarr")
        for step in (["ingest", *map(str, sources), "--archive", archive], ["preprocess", "--archive", archive]):
            subprocess.run(octseg + step, env=env, cwd=work, capture_output=True, check=True)
        # a flow run over the same up-to-date archive: the old behaviour of a no-op command
        flow_run = [sys.executable, "-c",
                    "from octseg.flows.console import run_flow as _run; from octseg.flows.config import PreprocessConfig; "
                    "from octseg.flows.preprocess import preprocess_archive; "
                    f"_run(preprocess_archive, PreprocessConfig(archive={archive!r}), False)"]
        cases = {
            "python -c pass (baseline)": [sys.executable, "-c", "pass"],
            "octseg --help": octseg + ["--help"],
            "user error (missing archive)": octseg + ["preprocess", "--archive", str(work / "missing.zarr")],
            "nothing to do (preprocess, up to date)": octseg + ["preprocess", "--archive", archive],
            "same, through a flow run": flow_run,
        }
        base = None
        print(f"{'case':42s} {'median s':>9s} {'x baseline':>11s}")
        for name, cmd in cases.items():
            t = _time(cmd, env, work, args.runs)
            base = base or t
            print(f"{name:42s} {t:9.2f} {t / base:11.1f}")


if __name__ == "__main__":
    main()
