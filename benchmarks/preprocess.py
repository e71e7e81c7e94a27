"""Preprocessing scaling: the same volumes on a 2-worker LocalCluster / a 1-worker one, same run.

Normalisation and border-weight maps of every volume of an archive (the Duke DME fluid B-scans, one
volume per subject, when ../shared/data is there; else phantoms of the same shape), computed the way
``octseg preprocess`` does: one task per volume, submitted together, each storing shard-aligned Dask
blocks into the archive. The clusters are started before the clock runs; the derived arrays are
removed between runs. Goal: 2 workers >= 1.8x 1 worker on this 2-core machine.

    .venv/bin/python benchmarks/preprocess.py
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from octseg.tasks.archive import open_archive
from octseg.tasks.cluster import dask_scheduler
from octseg.tasks.phantom import make_phantom_volume
from octseg.tasks.preprocess import preprocess_volume

DUKE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "duke_dme_fluid"


def build_archive(path: Path, copies: int) -> str:
    """Duke subjects (11 B-scans each, with fluid masks) as volumes, ``copies`` times; else phantoms."""
    archive = open_archive(path)
    provenance = {"reader": "bench"}
    if DUKE.is_dir():
        from skimage.io import imread

        rows = list(csv.DictReader((DUKE / "index.csv").open()))
        subjects = sorted({r["subject"] for r in rows})
        for copy in range(copies):
            for subject in subjects:
                mine = [r for r in rows if r["subject"] == subject]
                image = np.stack([imread(DUKE / "images" / f"{r['file_stem']}.png")[..., 0] for r in mine])
                masks = np.stack([(imread(DUKE / "masks" / f"{r['file_stem']}.png").max(-1) > 0) for r in mine])
                vid = f"{subject}_{copy}"
                archive.write_volume(vid, image, manual_labels=masks.astype(np.uint8),
                                     provenance={**provenance, "source": vid, "source_sha256": vid})
        return f"Duke DME fluid, {len(rows) * copies} B-scans in {len(subjects) * copies} volumes"
    for i in range(6 * copies):
        ph = make_phantom_volume(11, 496, 768, seed=i)
        archive.write_volume(f"phantom_{i}", ph.image, manual_labels=ph.fluid.astype(np.uint8),
                             provenance={**provenance, "source": str(i), "source_sha256": str(i)})
    return f"phantoms, {66 * copies} B-scans of 496 x 768 in {6 * copies} volumes"


def clear_derived(path: Path) -> None:
    for derived in path.glob("*/derived"):
        shutil.rmtree(derived)


def run(path: Path, address: str) -> float:
    volumes = open_archive(path, create=False).volume_ids()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(volumes)) as pool:  # the flow maps one task per volume
        results = list(pool.map(lambda v: preprocess_volume(path, v, address), volumes))
    seconds = time.perf_counter() - t0
    assert all(r.computed == ["normalized", "weights"] for r in results), results
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description="preprocess: 2-worker / 1-worker LocalCluster speed-up")
    parser.add_argument("--copies", type=int, default=1, help="repeat the data set this many times")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="octseg-bench-") as tmp:
        path = Path(tmp) / "a.zarr"
        what = build_archive(path, args.copies)
        times = {}
        for workers in (1, 2):
            with dask_scheduler(None, workers, threads=1) as address:
                clear_derived(path)
                run(path, address)  # warm-up: worker imports, first compilation of the graph
                best = []
                for _ in range(args.repeats):
                    clear_derived(path)
                    best.append(run(path, address))
                times[workers] = min(best)
        print(f"{what}: normalisation + border-weight maps")
        print(f"1 worker:  {times[1]:.2f} s")
        print(f"2 workers: {times[2]:.2f} s")
        print(f"speed-up = {times[1] / times[2]:.2f}  (goal >= 1.8)")


if __name__ == "__main__":
    main()
