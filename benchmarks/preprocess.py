"""Preprocessing scaling: the same volumes on a 2-worker LocalCluster / a 1-worker one, same run.

Normalisation and border-weight maps of every volume of an archive (the Duke DME fluid B-scans, one
volume per subject, when ../shared/data is there; else phantoms of the same shape), computed the way
``octseg preprocess`` does: one task per volume, submitted together, each storing shard-aligned Dask
blocks into the archive. The clusters are started before the clock runs; the derived arrays are
removed between runs. Both clusters stay up and each round times both, in alternating order. The
flow runs one task per volume when there are at least as many volumes as workers (``--spread volume``),
else spreads a volume's shard-aligned blocks (``--spread blocks``). Goal: 2 workers >= 1.8x 1 worker
on this 2-core machine.

    .venv/bin/python benchmarks/preprocess.py [--rounds 6] [--spread volume|blocks]
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from octseg.tasks.archive.store import open_archive
from octseg.tasks.runtime.cluster import dask_scheduler
from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.tasks.preprocess.derive import preprocess_volume

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


def run(path: Path, address: str, spread: str) -> float:
    volumes = open_archive(path, create=False).volume_ids()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(volumes)) as pool:  # the flow maps one task per volume
        results = list(pool.map(lambda v: preprocess_volume(path, v, address, spread=spread), volumes))
    seconds = time.perf_counter() - t0
    assert all(r.computed == ["normalized", "weights"] for r in results), results
    return seconds


def _compute_only(pair: tuple[np.ndarray, np.ndarray]) -> float:
    """The per-B-scan arithmetic of preprocessing, on arrays already in memory: no Zarr, no graph."""
    from octseg.unet.normalize import normalize_volume
    from octseg.unet.weights import border_weight_map

    image, labels = pair
    normalize_volume(image[np.newaxis])
    return float(border_weight_map(labels).mean())


def ceiling(path: Path, clusters: dict[int, str]) -> dict[int, float]:
    """Seconds for the arithmetic alone (B-scans scattered to the workers first), per cluster: the speed-up
    this machine gives the compute itself, the most the whole job could show."""
    from octseg.tasks.runtime.cluster import client_for

    archive = open_archive(path, create=False)
    pairs = [(np.asarray(archive.image(v)[z]), np.asarray(archive.manual_labels(v)[0][z]))
             for v in archive.volume_ids() for z in range(archive.image(v).shape[0])]
    out = {}
    for workers, address in clusters.items():
        client = client_for(address)
        data = client.scatter(pairs)
        client.gather(client.map(_compute_only, data[:4], pure=False))  # warm-up
        t0 = time.perf_counter()
        client.gather(client.map(_compute_only, data, pure=False))
        out[workers] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="preprocess: 2-worker / 1-worker LocalCluster speed-up")
    parser.add_argument("--copies", type=int, default=1, help="repeat the data set this many times")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--spread", choices=["volume", "blocks"], default="volume",
                        help="one task per volume (what the flow does with enough volumes) or per shard block")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="octseg-bench-") as tmp:
        path = Path(tmp) / "a.zarr"
        what = build_archive(path, args.copies)
        # both clusters up for the whole run; each round times both, in alternating order (ABBA), so a
        # noisy moment of this shared machine falls on both sides of a ratio
        with dask_scheduler(None, 1, threads=1) as one, dask_scheduler(None, 2, threads=1) as two:
            clusters = {1: one, 2: two}
            for address in clusters.values():  # warm-up: worker imports, first graph
                clear_derived(path)
                run(path, address, args.spread)
            ratios, times = [], {1: [], 2: []}
            for r in range(args.rounds):
                order = (1, 2) if r % 2 == 0 else (2, 1)
                for workers in order:
                    clear_derived(path)
                    times[workers].append(run(path, clusters[workers], args.spread))
                ratios.append(times[1][-1] / times[2][-1])
                print(f"  round {r}: 1 worker {times[1][-1]:.2f} s, 2 workers {times[2][-1]:.2f} s, "
                      f"speed-up {ratios[-1]:.2f}")
            bare = [ceiling(path, clusters) for _ in range(3)]
        print(f"{what}: normalisation + border-weight maps, one task per {args.spread}")
        bare_ratio = statistics.median(b[1] / b[2] for b in bare)
        print(f"compute alone (in memory, no Zarr): 1 worker {statistics.median(b[1] for b in bare):.2f} s, "
              f"2 workers {statistics.median(b[2] for b in bare):.2f} s, speed-up {bare_ratio:.2f}: this machine's ceiling")
        print(f"1 worker:  {statistics.median(times[1]):.2f} s (median)")
        print(f"2 workers: {statistics.median(times[2]):.2f} s (median)")
        print(f"speed-up = {statistics.median(ratios):.2f} (median of {args.rounds} rounds, "
              f"{min(ratios):.2f}-{max(ratios):.2f}; goal >= 1.8)")


if __name__ == "__main__":
    main()
