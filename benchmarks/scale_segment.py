"""Benchmark: the segment flow over an archive that ``scale.py --keep`` built (and ingested, preprocessed).

``scale.py`` builds, ingests, preprocesses and segments in one run; at 100,000 volumes that is most of a
day on a 2-core machine, so its steps can be taken apart: ``scale.py --volumes 100000 --keep DIR`` (stop it
after its ingest line), ``octseg preprocess --archive WORKDIR/archive.zarr --workers 2``, then this script on
the same WORKDIR. It starts a ``prefect server`` on the WORKDIR's own SQLite database, registers a tiny
U-Net in WORKDIR/mlflow.db and measures what ``scale.py`` measures for segment, with the same functions:

* compute per volume on one torch thread (as a worker runs it), and the bare 2-worker Dask floor (no
  Prefect, no flow) on a sample before and after;
* the flow's seconds per volume and its overhead beyond compute / workers and beyond bare Dask;
* the flow process's RSS at 10% and 90% of the run and its growth per volume;
* the Prefect database's growth per 1,000 volumes, the API latency of the flow run's page, how long after
  the flow's end the server lists every task run; then the no-op ``octseg segment`` as a user runs it.

    nice -n 5 .venv/bin/python benchmarks/scale_segment.py /tmp/s100k/octseg-scale-100000-sqlite-XXXX --out seg.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scale_servers import clean_env, prefect_server, run_child  # beside this script

WORKERS = 2


def child(workdir: Path, api: str, db: str) -> dict:
    os.environ.setdefault("OCTSEG_PROGRESS", "0")
    from scale import _bare_dask, _command, _compute_per_volume, _register_model, _segment

    from octseg.flows.config import SegmentConfig
    from octseg.tasks.archive.catalogue import catalogue_for

    archive, tracking = workdir / "archive.zarr", f"sqlite:///{workdir}/mlflow.db"
    ids = sorted(catalogue_for(archive).entries())
    n = len(ids)
    print(f"[{n}] volumes in the catalogue", flush=True)
    _register_model(tracking)
    compute = _compute_per_volume(archive, tracking, ids[:21])
    sample = max(40, min(400, n // 25))
    bare = [_bare_dask(archive, tracking, ids[-sample:])]
    print(f"[{n}] compute {compute:.4f} s/volume on one thread; bare Dask {bare[0]:.4f} s/volume", flush=True)
    cfg = SegmentConfig(archive=archive, tracking_uri=tracking, dask_address=None, n_workers=WORKERS,
                        qc_dir=workdir / "qc", force=True)
    result = {"volumes": n, "compute_per_volume_s": round(compute, 4), "segment": _segment(cfg, api, db, n, compute, bare[0])}
    bare.append(_bare_dask(archive, tracking, ids[-2 * sample : -sample]))
    result["bare_dask_per_volume_s"] = [round(b, 4) for b in bare]
    result["segment"]["overhead_vs_bare_dask_s"] = round(result["segment"]["per_volume_s"] - sum(bare) / 2, 4)
    print(f"[{n}] segment {result['segment']}; bare Dask {result['bare_dask_per_volume_s']} s/volume", flush=True)
    env = {**clean_env(workdir), "PREFECT_API_URL": api}
    result["noop_octseg_segment_s"] = [_command(["segment", "--archive", str(archive), "--tracking-uri", tracking], env)
                                       for _ in range(3)]
    print(f"[{n}] no-op octseg segment {result['noop_octseg_segment_s']} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a folder scale.py --keep made (archive.zarr, prefect.db)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("API", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.workdir, *args.child)), flush=True)
        return
    root = args.workdir.resolve()
    if not (root / "archive.zarr").is_dir():
        parser.error(f"{root}: no archive.zarr here (make one with scale.py --keep)")
    with prefect_server(root, "sqlite") as (api, db):
        env = {**clean_env(root), "PREFECT_API_URL": api}
        result = run_child([sys.executable, __file__, str(root), "--child", api, db], env, "the segment run")
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
