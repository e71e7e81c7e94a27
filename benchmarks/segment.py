"""Benchmark P1: archive -> archive segmentation throughput / the bare forward floor, same network, same run.

The floor is the network alone on whole B-scans already in memory, mirror-padded to the smallest valid
input that covers them, in inference mode, at the best of batch sizes 1, 2 and 4. The archive path is
``octseg.tasks.segmentation.segment.segment_one``: read the image from Zarr, normalise, run the network, write the
labels shard by shard into a staged prediction and publish it (what each Dask task of ``octseg
segment`` runs). P1 = archive B-scans/s / floor B-scans/s (goal >= 0.90 on CPU).

``--small-volumes N`` also runs the whole flow (Prefect, MLflow registry, a Dask LocalCluster) over N
small volumes and prints the overhead per volume beyond its compute, and the flow process's peak memory.

    .venv/bin/python benchmarks/segment.py                      # Duke Subject_01 (or phantoms), depth 4, 16 ch
    .venv/bin/python benchmarks/segment.py --bscans 61 --device cuda --base 64 --amp
    .venv/bin/python benchmarks/segment.py --small-volumes 1000
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from octseg.tasks.archive.store import open_archive
from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.tasks.segmentation.segment import segment_one
from octseg.unet.config import InferenceConfig, UNetConfig
from octseg.unet.inference import CHANNELS_LAST_DEVICES, covering_input, resolve_device
from octseg.unet.model import UNet
from octseg.unet.normalize import normalize_volume

DUKE_VOLUME = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "duke_dme_subject01_volume"
INFO = {"model_name": "bench", "model_version": "1", "run_id": "-", "model_uri": "models:/bench/1"}
NAMES = {0: "background", 1: "fluid"}


def load_volume(n: int) -> tuple[np.ndarray, str]:
    """``n`` B-scans of Duke Subject_01 (496 x 768) when ../shared/data is there, else phantoms of that size."""
    if DUKE_VOLUME.is_dir():
        from skimage.io import imread

        files = sorted(DUKE_VOLUME.glob("Subject_01_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))[:n]
        if files:
            return np.stack([imread(f) for f in files]).astype(np.uint8), f"Duke Subject_01, {len(files)} B-scans"
    return make_phantom_volume(n, 496, 768, seed=0).image, f"phantom, {n} B-scans"


def _padded(model: UNet, volume: np.ndarray, device: torch.device) -> torch.Tensor:
    """The normalised B-scans mirror-padded to the smallest valid input that covers them, (N, 1, th, tw)."""
    n, h, w = volume.shape
    d, p = model.config.depth, model.config.padding
    th, tw = covering_input(h, d, p), covering_input(w, d, p)
    halo_y, halo_x = (th - model.output_size(th)) // 2, (tw - model.output_size(tw)) // 2
    padded = np.pad(normalize_volume(volume), ((0, 0), (halo_y, th - h - halo_y), (halo_x, tw - w - halo_x)),
                    mode="reflect")[:, None]
    x = torch.from_numpy(padded).to(device)
    return x.contiguous(memory_format=torch.channels_last) if device.type in CHANNELS_LAST_DEVICES else x


def floor(model: UNet, x_all: torch.Tensor, device: torch.device, amp: bool, batch: int) -> float:
    """B-scans/s of the network alone on whole, padded, in-memory B-scans: the forward pass and arg-max."""
    n = len(x_all)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            model(x_all[i : i + batch]).argmax(1).cpu()
        _sync(device)
        return n / (time.perf_counter() - t0)


def best_batch(model: UNet, x_all: torch.Tensor, device: torch.device, amp: bool) -> int:
    """The fastest of batch sizes 1, 2, 4 (GPU: up to 32) for the floor, after a warm-up of each."""
    sizes = (1, 2, 4) if device.type == "cpu" else (1, 4, 8, 16, 32)
    rates = {}
    for batch in sizes:
        floor(model, x_all[:batch], device, amp, batch)  # warm-up
        rates[batch] = floor(model, x_all[: max(batch, min(len(x_all), 4 * batch))], device, amp, batch)
    return max(rates, key=rates.get)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def archive_rate(model: UNet, archive: Path, n: int, inference: InferenceConfig) -> float:
    """B-scans/s of segment_one: Zarr in, normalise, network, staged shard writes, publish."""
    t0 = time.perf_counter()
    segment_one(archive, "v", model, INFO, NAMES, inference, force=True)
    return n / (time.perf_counter() - t0)


def _sample_rss(samples: list[float], stop: threading.Event) -> None:
    """This process's resident memory in MiB, every 0.2 s until ``stop``."""
    import psutil

    me = psutil.Process()
    while not stop.wait(0.2):
        samples.append(me.memory_info().rss / 2**20)


def small_volumes(n: int, workers: int) -> None:
    """The whole flow over ``n`` small volumes on a LocalCluster: overhead per volume and peak memory."""
    import os

    os.environ.setdefault("OCTSEG_PROGRESS", "0")
    from prefect.testing.utilities import prefect_test_harness

    from octseg.flows.config import SegmentConfig
    from octseg.flows.runs import summary_of
    from octseg.flows.segment import segment_archive
    from octseg.tasks.tracking.models import log_unet
    from octseg.tasks.tracking.uri import ensure_experiment, using_tracking_uri

    import mlflow

    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2)
    with tempfile.TemporaryDirectory(prefix="octseg-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        with using_tracking_uri(uri), mlflow.start_run(experiment_id=ensure_experiment(uri, "bench")):
            version = log_unet(model, "bench", metadata={"class_names": {"0": "background", "1": "fluid"}})
        archive = open_archive(Path(tmp) / "a.zarr")
        rng = np.random.default_rng(0)
        for i in range(n):
            archive.write_volume(f"v{i:04d}", rng.integers(0, 255, (8, 64, 96), dtype=np.uint8),
                                 provenance={"source": str(i), "source_sha256": str(i), "reader": "bench"})
        t0 = time.perf_counter()
        segment_one(archive.path, "v0000", model, {**INFO, "model_version": "0"}, NAMES, InferenceConfig(device="cpu"),
                    qc_dir=Path(tmp) / "qc")
        compute = time.perf_counter() - t0  # one volume with its QC picture, in this process
        cfg = SegmentConfig(archive=archive.path, model_uri=f"models:/bench/{version}", tracking_uri=uri,
                            n_workers=workers, inference=InferenceConfig(device="cpu"))
        with prefect_test_harness():
            samples: list[float] = []
            sampler = threading.Thread(target=_sample_rss, args=(samples, stop := threading.Event()), daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            summary = summary_of(segment_archive(cfg, return_state=True))
            wall = time.perf_counter() - t0
            stop.set()
            sampler.join()
    assert len(summary.segmented) == n, summary.headline()
    per_volume = wall / n
    print(f"{n} volumes of 8x64x96 on a {workers}-worker LocalCluster: {wall:.1f} s, {per_volume:.3f} s per volume; "
          f"compute of one volume in-process {compute:.3f} s")
    print(f"overhead per volume beyond its compute: {per_volume - compute / workers:.3f} s (goal < 0.1)")
    tenth = max(1, len(samples) // 10)
    print(f"flow process RSS: {np.mean(samples[:tenth]):.0f} MiB in the first tenth of the run, "
          f"{np.mean(samples[-tenth:]):.0f} MiB in the last, peak {max(samples):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description="P1 = archive->archive B-scans/s / bare forward B-scans/s")
    parser.add_argument("--bscans", type=int, default=16)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved floor/archive rounds")
    parser.add_argument("--small-volumes", type=int, default=0, help="also run the flow over this many small volumes")
    parser.add_argument("--workers", type=int, default=1, help="LocalCluster workers for --small-volumes")
    args = parser.parse_args()
    device = resolve_device(args.device)
    volume, what = load_volume(args.bscans)
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=args.base, depth=args.depth)).to(device).eval()
    if device.type in CHANNELS_LAST_DEVICES:  # the floor in the layout segment_one uses
        model = model.to(memory_format=torch.channels_last)
    inference = InferenceConfig(device=args.device, amp=args.amp)
    x_all = _padded(model, volume, device)
    batch = best_batch(model, x_all, device, args.amp)
    floors, rates, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="octseg-bench-") as tmp:
        archive = open_archive(Path(tmp) / "a.zarr")
        archive.write_volume("v", volume, provenance={"source": "bench", "source_sha256": "-", "reader": "bench"})
        archive_rate(model, archive.path, len(volume), inference)  # warm-up
        for _ in range(args.repeats):  # interleaved, so a noisy minute hits both sides of a round
            floors.append(floor(model, x_all, device, args.amp, batch))
            rates.append(archive_rate(model, archive.path, len(volume), inference))
            ratios.append(rates[-1] / floors[-1])
    print(f"{what} {volume.shape[1]}x{volume.shape[2]}; U-Net depth {args.depth}, {args.base} channels, "
          f"{device}{' bf16' if args.amp else ''}, {torch.get_num_threads()} threads")
    print(f"bare forward (whole B-scans in memory, batch {batch}): {np.median(floors):8.2f} B-scans/s (median)")
    print(f"archive -> archive (segment_one):                  {np.median(rates):8.2f} B-scans/s (median)")
    print(f"P1 = {np.median(ratios):.2f}  (median of the rounds' ratios {', '.join(f'{r:.2f}' for r in ratios)}; "
          "goal >= 0.90)")
    if args.small_volumes:
        small_volumes(args.small_volumes, args.workers)


if __name__ == "__main__":
    main()
