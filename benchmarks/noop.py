"""Benchmark: each command's no-op on an archive ``benchmarks/scale.py`` built, timed over several rounds.

A no-op at 100,000 volumes takes a few seconds, and this machine's neighbours move such figures by a second
or more; so each command runs ``--rounds`` times, the commands interleaved (one round runs every command
once), and the median and range are printed. Each run is a new process as a user runs it (Python's start
and imports included) against the embedded defaults, and must say it has nothing to do.

    .venv/bin/python benchmarks/scale.py --volumes 10000 --replicate 10 --keep /tmp/scale  # builds the archive
    .venv/bin/python benchmarks/noop.py /tmp/scale/octseg-scale-10000-sqlite-*/ --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scale import _noop_commands  # beside this script
from scale_servers import clean_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a folder benchmarks/scale.py built (--keep)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    volumes = sum(1 for p in (workdir / "archive.zarr").iterdir() if p.is_dir())
    env = clean_env(workdir)
    env.pop("PREFECT_API_URL", None)  # the no-ops start no flow run: no server needed
    times: dict[str, list[float]] = {}
    for k in range(args.rounds):
        for command, seconds in _noop_commands(workdir, env, f"sqlite:///{workdir}/mlflow.db").items():
            times.setdefault(command, []).append(seconds)
        print(f"round {k + 1}: " + ", ".join(f"{c} {t[-1]:.2f} s" for c, t in times.items()), flush=True)
    summary = {c: {"median_s": round(statistics.median(t), 2), "min_s": min(t), "max_s": max(t)}
               for c, t in times.items()}
    print(json.dumps({"volumes": volumes, "rounds": args.rounds, **summary}, indent=1))
    print(f"| no-op at {volumes:,} volumes | " + " | ".join(f"`{c.replace('octseg_', 'octseg ')}`" for c in summary)
          + " |\n|---|" + "---|" * len(summary) + f"\n| median (min-max) of {args.rounds} runs, s | "
          + " | ".join(f"{s['median_s']:.2f} ({s['min_s']:.2f}-{s['max_s']:.2f})" for s in summary.values()) + " |")


if __name__ == "__main__":
    main()
