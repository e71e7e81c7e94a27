"""Benchmark: octseg at 1,000 to 100,000 volumes. Orchestration, not compute: each volume is tiny.

Builds an archive of N volumes of 2 B-scans of 64 x 64 (``.npy`` files in a drop folder, ingested by the
flow) against a real ``prefect server`` (its database SQLite or PostgreSQL) and measures, per N:

* ingest: seconds per volume of the ``ingest-volumes`` flow (4 threads);
* preprocess and segment: seconds per volume of their flows on a 2-worker Dask LocalCluster, and for segment
  the overhead per volume beyond its compute (``wall / N - compute / workers``, compute measured here on
  single-threaded torch as a worker runs it);
* the flow process's RSS at 10% and 90% of the segment run (sampled every 0.2 s), and its growth per volume;
* the Prefect database's growth per 1,000 volumes for each flow (bytes and rows: task runs, states, logs,
  events);
* each command's no-op: the plan alone in this process (``plan_ingest``, ``plan_preprocess``,
  ``plan_segmentation``, ``scan_inbox``) and the whole command as a user runs it (``octseg ingest
  --sources-file``, ``watch``, ``preprocess``, ``segment``, ``catalogue``).

``--compare`` instead segments the same N volumes twice (``--force``), one Prefect task run per volume and
one per batch (the default), and adds the API latency of the flow run's page (the calls the UI makes) and
how long after the flow's end the server has recorded every task run.

    .venv/bin/python benchmarks/scale.py --volumes 1000                      # SQLite Prefect server
    .venv/bin/python benchmarks/scale.py --volumes 1000 10000 --prefect both  # and on PostgreSQL
    .venv/bin/python benchmarks/scale.py --volumes 5000 --compare --prefect postgres
    nice -n 10 .venv/bin/python benchmarks/scale.py --volumes 100000 --prefect postgres --out scale-100k.json
    .venv/bin/python benchmarks/scale.py --volumes 10000 --replicate 10   # no-ops at 100,000 in ~40 min

``--replicate K`` then hard-links every volume and inbox file of the built archive K - 1 more times under new
ids (``vol000123-r1``, ...), as if the flows had written them (they are the same bytes), lets ``octseg
catalogue`` and one ``octseg watch`` record them, and times the no-op commands again at N x K volumes: the
no-op figures at 100,000 without ingesting, preprocessing and segmenting 100,000 volumes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from scale_servers import api_latency, clean_env, db_stats, growth, prefect_server, recorded_lag, run_child  # beside this script

BIN = Path(sys.executable).parent
SHAPE = (2, 64, 64)
WORKERS = 2


# ---- the measurements, run in a child process pointed at the server -------------------------------------

class RSS:
    """This process's resident memory, sampled every 0.2 s while the block runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def __enter__(self) -> RSS:
        import psutil

        me = psutil.Process()

        def sample() -> None:
            while not self._stop.wait(0.2):
                self.samples.append((time.perf_counter(), me.memory_info().rss))

        self._thread = threading.Thread(target=sample, daemon=True)
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.t1 = time.perf_counter()

    def at(self, fraction: float) -> float:
        """Median RSS (MiB) over the samples within 2.5% of the run either side of ``fraction`` of it."""
        span = self.t1 - self.t0
        near = [r for t, r in self.samples if abs((t - self.t0) / span - fraction) <= 0.025] or [
            min(self.samples, key=lambda s: abs((s[0] - self.t0) / span - fraction))[1]]
        return statistics.median(near) / 2**20


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def _command(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of an ``octseg`` command run as a user runs it (a new process); it must exit 0 (the plans in
    this process have shown there is nothing to do)."""
    t0 = time.perf_counter()
    done = subprocess.run([str(BIN / "octseg"), *args], env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"octseg {' '.join(args)} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return round(wall, 2)


def _make_sources(inbox: Path, n: int) -> list[str]:
    import numpy as np

    inbox.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    then = time.time() - 600
    files = []
    for i in range(n):
        path = inbox / f"vol{i:06d}.npy"
        np.save(path, rng.integers(0, 255, SHAPE, dtype=np.uint8))
        os.utime(path, (then, then))  # settled
        files.append(str(path))
    return files


def _register_model(tracking: str) -> str:
    import mlflow
    import torch
    from octseg.tasks.tracking.models import log_unet
    from octseg.tasks.tracking.uri import ensure_experiment, using_tracking_uri
    from octseg.unet.model import UNet

    torch.manual_seed(0)
    with using_tracking_uri(tracking), mlflow.start_run(experiment_id=ensure_experiment(tracking, "scale")):
        version = log_unet(UNet(base_channels=4, depth=2), "octseg-unet",
                           metadata={"class_names": {"0": "background", "1": "fluid"}})
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking).set_registered_model_alias("octseg-unet", "champion", version)
    return version


def _compute_per_volume(archive: Path, tracking: str, volumes: list[str]) -> float:
    """Seconds one volume takes in segment_one on one thread (as a worker of the 2-worker cluster runs it),
    with its QC picture; written as another model version, so the flow still segments these volumes."""
    import torch
    from octseg.tasks.segmentation.segment import segment_one
    from octseg.tasks.tracking.models import cached_unet, resolve_model
    from octseg.unet.config import InferenceConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = resolve_model("models:/octseg-unet@champion", tracking)
        model = cached_unet(ref, tracking, "cpu")
        info = {"model_name": "octseg-unet", "model_version": "0", "run_id": "-", "model_uri": "-"}
        names = {0: "background", 1: "fluid"}
        segment_one(archive, volumes[0], model, info, names, InferenceConfig(device="cpu"), qc_dir=archive.parent / "q")
        t0 = time.perf_counter()
        for vid in volumes[1:]:
            segment_one(archive, vid, model, info, names, InferenceConfig(device="cpu"), qc_dir=archive.parent / "q")
        return (time.perf_counter() - t0) / (len(volumes) - 1)
    finally:
        torch.set_num_threads(threads)


def _bare_dask(archive: Path, tracking: str, volumes: list[str]) -> float:
    """Seconds per volume of the same work on a 2-worker LocalCluster with no Prefect and no flow: each volume
    submitted to Dask at once and gathered (after each worker loaded the model). The floor under the flow."""
    from octseg.tasks.runtime.cluster import client_for, dask_scheduler
    from octseg.tasks.segmentation.segment import segment_registered
    from octseg.tasks.tracking.models import resolve_model
    from octseg.unet.config import InferenceConfig

    ref = resolve_model("models:/octseg-unet@champion", tracking)
    kw = dict(requested_uri="models:/octseg-unet@champion", inference=InferenceConfig(device="cpu"),
              qc_dir=str(archive.parent / "qc"), force=True)
    with dask_scheduler(None, WORKERS) as address:
        client = client_for(address)
        warm = [client.submit(segment_registered, str(archive), v, ref, tracking, **kw, pure=False) for v in volumes[:WORKERS * 2]]
        client.gather(warm)
        del warm
        t0 = time.perf_counter()
        futures = [client.submit(segment_registered, str(archive), v, ref, tracking, **kw, pure=False)
                   for v in volumes[WORKERS * 2:]]
        client.gather(futures)
        wall = time.perf_counter() - t0
        del futures
    return wall / (len(volumes) - WORKERS * 2)


def _segment(cfg, api: str, db: str, n: int, compute: float, bare: float, per_task: int | None = None) -> dict:
    from octseg.flows.runs import summary_of
    from octseg.flows.segment import segment_archive
    from octseg.tasks.runtime.batches import batch_size

    cfg = cfg.model_copy(update={"per_task": per_task})
    before = db_stats(db)
    with RSS() as rss:
        state = segment_archive(cfg, return_state=True)
    ended = time.perf_counter()
    summary = summary_of(state)
    assert len(summary.segmented) == n and not summary.failures, summary.headline()
    wall = rss.t1 - rss.t0
    size = batch_size(n, per_task)
    expected = -(-n // size)
    lag = recorded_lag(api, str(state.state_details.flow_run_id), expected, ended)
    out = {"volumes_per_task_run": size, "task_runs": expected, "seconds": round(wall, 1),
           "per_volume_s": round(wall / n, 4), "overhead_per_volume_s": round(wall / n - compute / WORKERS, 4),
           "overhead_vs_bare_dask_s": round(wall / n - bare, 4),
           "rss_10_mib": round(rss.at(0.1), 1), "rss_90_mib": round(rss.at(0.9), 1),
           "rss_growth_kib_per_volume": round((rss.at(0.9) - rss.at(0.1)) * 1024 / (0.8 * n), 3),
           "recorded_lag_s": lag, "db_per_1000": growth(before, db_stats(db), n),
           "api_ms": api_latency(api, str(state.state_details.flow_run_id))}
    return out


def _replicate(workdir: Path, copies: int) -> int:
    """Hard-link every volume of the archive and every inbox file ``copies - 1`` more times under new ids; the
    number of volumes after."""
    archive, inbox = workdir / "archive.zarr", workdir / "inbox"
    volumes = sorted(e.name for e in os.scandir(archive) if e.is_dir() and e.name.startswith("vol"))
    added = []
    for vid in volumes:
        tree = [(os.path.relpath(d, archive / vid), files) for d, _, files in os.walk(archive / vid)]
        for k in range(1, copies):
            new = f"{vid}-r{k}"
            for rel, files in tree:
                os.makedirs(archive / new / rel, exist_ok=True)
                for f in files:
                    os.link(archive / vid / rel / f, archive / new / rel / f)
            os.link(inbox / f"{vid}.npy", inbox / f"{new}.npy")
            added.append(str(inbox / f"{new}.npy"))
    with (workdir / "sources.txt").open("a") as listing:
        listing.write("".join(f"{f}\n" for f in added))
    return len(volumes) * copies


def _noop_commands(workdir: Path, env: dict[str, str], tracking: str) -> dict[str, float]:
    a = ["--archive", str(workdir / "archive.zarr")]
    return {"octseg_ingest": _command(["ingest", "--sources-file", str(workdir / "sources.txt"), *a], env),
            "octseg_watch": _command(["watch", "--inbox", str(workdir / "inbox"), *a], env),
            "octseg_preprocess": _command(["preprocess", *a], env),
            "octseg_segment": _command(["segment", *a, "--tracking-uri", tracking], env),
            "octseg_catalogue": _command(["catalogue", *a], env)}


def child(n: int, workdir: Path, api: str, db: str, compare: bool, replicate: int = 1) -> dict:
    os.environ.setdefault("OCTSEG_PROGRESS", "0")
    from octseg.flows.config import (
        IngestConfig,
        PreprocessConfig,
        SegmentConfig,
        WatchConfig,
    )
    from octseg.flows.ingest import ingest_volumes
    from octseg.flows.plans import plan_ingest, plan_preprocess, plan_segmentation
    from octseg.flows.preprocess import preprocess_archive
    from octseg.flows.runs import summary_of
    from octseg.tasks.ingest.inbox import scan_inbox
    from octseg.tasks.ingest.known import read_settings
    from octseg.tasks.tracking.models import resolve_model

    inbox, archive, tracking = workdir / "inbox", workdir / "archive.zarr", f"sqlite:///{workdir}/mlflow.db"
    env = {**clean_env(workdir), "PREFECT_API_URL": api}
    result: dict = {"volumes": n, "prefect_db": db.split(":")[0].split("+")[0], "workers": WORKERS}
    t, files = _timed(_make_sources, inbox, n)
    print(f"[{n}] {n} sources written in {t:.1f} s", flush=True)

    listing = workdir / "sources.txt"  # the list in a file (--sources-file), as the command passes many
    listing.write_text("".join(f"{f}\n" for f in files))
    ingest_cfg = IngestConfig(sources_file=listing, archive=archive, dask_address=None)
    before = db_stats(db)
    wall, state = _timed(ingest_volumes, ingest_cfg, return_state=True)
    summary = summary_of(state)
    assert len(summary.written) == n and not summary.failures, summary.headline()
    result["ingest"] = {"seconds": round(wall, 1), "per_volume_s": round(wall / n, 4),
                        "db_per_1000": growth(before, db_stats(db), n)}
    print(f"[{n}] ingest {result['ingest']}", flush=True)

    pre_cfg = PreprocessConfig(archive=archive, dask_address=None, n_workers=WORKERS)
    before = db_stats(db)
    wall, state = _timed(preprocess_archive, pre_cfg, return_state=True)
    summary = summary_of(state)
    assert len(summary.computed) == n and not summary.failures, summary.headline()
    result["preprocess"] = {"seconds": round(wall, 1), "per_volume_s": round(wall / n, 4),
                            "db_per_1000": growth(before, db_stats(db), n)}
    print(f"[{n}] preprocess {result['preprocess']}", flush=True)

    _register_model(tracking)
    ref = resolve_model("models:/octseg-unet@champion", tracking)
    ids = sorted(p.stem for p in map(Path, files))
    compute = _compute_per_volume(archive, tracking, ids[:21])
    sample = max(40, min(400, n // 25))
    bare = [_bare_dask(archive, tracking, ids[-sample:])]
    # force: the bare runs rewrote some predictions with the champion; the flow does every volume regardless
    seg_cfg = SegmentConfig(archive=archive, tracking_uri=tracking, dask_address=None, n_workers=WORKERS,
                            qc_dir=workdir / "qc", force=True)
    result["compute_per_volume_s"] = round(compute, 4)
    if compare:
        result["segment_per_volume_task_runs"] = _segment(seg_cfg, api, db, n, compute, bare[0], per_task=1)
        print(f"[{n}] segment, a task run per volume {result['segment_per_volume_task_runs']}", flush=True)
    result["segment"] = _segment(seg_cfg, api, db, n, compute, bare[0])
    bare.append(_bare_dask(archive, tracking, ids[-2 * sample : -sample]))
    result["bare_dask_per_volume_s"] = [round(b, 4) for b in bare]
    result["segment"]["overhead_vs_bare_dask_s"] = round(result["segment"]["per_volume_s"] - sum(bare) / 2, 4)
    print(f"[{n}] segment {result['segment']}; bare Dask {result['bare_dask_per_volume_s']} s/volume", flush=True)

    settings = read_settings(WatchConfig(inbox=inbox, archive=archive).reader_options.model_dump(), 2**28)
    noop = {}
    noop["ingest_plan"], (todo, _) = _timed(plan_ingest, ingest_cfg)
    assert todo == [], len(todo)
    noop["watch_plan"], scan = _timed(scan_inbox, inbox, archive, settle_seconds=60, settings=settings)
    assert scan.new == [] and len(scan.known) == n and scan.hashed == 0, (len(scan.new), scan.hashed)
    noop["preprocess_plan"], (todo, _) = _timed(plan_preprocess, pre_cfg)
    assert todo == [], len(todo)
    noop["segment_plan"], (todo, _) = _timed(plan_segmentation, seg_cfg.model_copy(update={"force": False}), ref)
    assert todo == [], len(todo)
    noop = {k: round(v, 2) for k, v in noop.items()}
    noop.update(_noop_commands(workdir, env, tracking))
    result["noop_s"] = noop
    print(f"[{n}] no-op {noop}", flush=True)
    if replicate > 1:
        t, total = _timed(_replicate, workdir, replicate)
        print(f"[{n}] hard-linked to {total} volumes in {t:.0f} s", flush=True)
        first = {"catalogue_sync_s": _command(["catalogue", "--archive", str(archive)], env),
                 "watch_hashing_new_names_s": _command(["watch", "--inbox", str(inbox), "--archive", str(archive)], env)}
        result["replicated"] = {"volumes": total, **first, "noop_s": _noop_commands(workdir, env, tracking)}
        print(f"[{n}] at {total} volumes {result['replicated']}", flush=True)
    return result


# ---- the parent: servers, children, the table ---------------------------------------------------------

def _table(results: list[dict]) -> str:
    lines = ["| volumes | Prefect DB | ingest s/vol | preprocess s/vol | segment s/vol | segment overhead s/vol "
             "(beyond compute/2; beyond bare Dask) | "
             "RSS 10% -> 90% MiB (KiB/vol) | no-op plans ingest/watch/preprocess/segment s | no-op commands "
             "ingest/watch/preprocess/segment s | Prefect DB per 1,000 vol (ingest+preprocess+segment) |",
             "|" + "---|" * 10]
    for r in results:
        s, nop = r["segment"], r["noop_s"]
        db = sum(r[k]["db_per_1000"]["bytes"] for k in ("ingest", "preprocess", "segment")) / 2**20
        lines.append(
            f"| {r['volumes']:,} | {r['prefect_db']} | {r['ingest']['per_volume_s']} | {r['preprocess']['per_volume_s']} "
            f"| {s['per_volume_s']} | {s['overhead_per_volume_s']}; {s['overhead_vs_bare_dask_s']} | "
            f"{s['rss_10_mib']} -> {s['rss_90_mib']} "
            f"({s['rss_growth_kib_per_volume']}) | {nop['ingest_plan']} / {nop['watch_plan']} / {nop['preprocess_plan']} / "
            f"{nop['segment_plan']} | {nop['octseg_ingest']} / {nop['octseg_watch']} / {nop['octseg_preprocess']} / "
            f"{nop['octseg_segment']} | "
            f"{db:.2f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, nargs="+", default=[1000])
    parser.add_argument("--prefect", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--compare", action="store_true", help="segment with a task run per volume, then per batch")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--replicate", type=int, default=1, metavar="K",
                        help="then hard-link the archive to K times its volumes and time the no-ops again")
    parser.add_argument("--child", nargs=4, metavar=("N", "WORKDIR", "API", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, workdir, api, db = args.child
        print("RESULT " + json.dumps(child(int(n), Path(workdir), api, db, args.compare, args.replicate)), flush=True)
        return
    kinds = ["sqlite", "postgres"] if args.prefect == "both" else [args.prefect]
    results = []
    for n in args.volumes:
        for kind in kinds:
            root = Path(tempfile.mkdtemp(prefix=f"octseg-scale-{n}-{kind}-", dir=args.keep))
            try:
                with prefect_server(root, kind) as (api, db):
                    env = {**clean_env(root), "PREFECT_API_URL": api}
                    cmd = [sys.executable, __file__, *(["--compare"] if args.compare else []),
                           "--replicate", str(args.replicate),
                           "--child", str(n), str(root), api, db]
                    results.append(run_child(cmd, env, f"the run of {n} volumes on {kind}"))
                if args.out:
                    args.out.write_text(json.dumps(results, indent=1))
            finally:
                if args.keep is None:
                    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=1))
    print(_table(results))


if __name__ == "__main__":
    main()
