"""``octseg demo``: the whole pipeline on synthetic OCT phantoms inside one work folder.

Annotated phantom volumes train the model; one more phantom volume is ingested without its masks
and held out, and its fluid Dice against the phantom's ground truth is reported at the end.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "DEMO_SHAPE"]

DEMO_SHAPE = (8, 128, 192)  # B-scans, depth, A-scans per phantom volume
HELDOUT = "heldout_000"


def _write_inputs(scans: Path, n_volumes: int) -> tuple[list[Path], np.ndarray]:
    """Annotated phantoms (masks in scans/labels) plus one held-out phantom without a mask.

    Files already written by an earlier demo in the same folder are kept (the phantoms are
    deterministic; rewriting would change the OME-TIFF UUIDs and so the files' sha256), so a second
    demo run shows every stage skipping its finished work.
    """
    from octseg.tasks.synthetic.phantom import make_phantom_volume, write_ome_tiff, write_phantom_files

    z, h, w = DEMO_SHAPE
    heldout = make_phantom_volume(z, h, w, seed=1000)
    sources = [scans / f"phantom_{i:03d}.tif" for i in range(n_volumes)] + [scans / f"{HELDOUT}.tif"]
    if not all(p.is_file() for p in sources) or not all((scans / "labels" / p.name).is_file() for p in sources[:-1]):
        write_phantom_files(scans, n_volumes=n_volumes, fmt="tiff", n_bscans=z, height=h, width=w, seed=0)
        write_ome_tiff(scans / f"{HELDOUT}.tif", heldout.image)
    return sources, heldout.fluid


def _demo_config(workdir: Path, sources: list[Path], epochs: int):
    from octseg.flows.config import IngestConfig, PipelineConfig, PreprocessConfig, SegmentConfig, TrainFlowConfig
    from octseg.unet.config import TrainConfig, UNetConfig

    archive = workdir / "archive.zarr"
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    return PipelineConfig(
        ingest=IngestConfig(sources=tuple(sources), archive=archive, labels=workdir / "scans" / "labels"),
        preprocess=PreprocessConfig(archive=archive, dask_address=None, n_workers=2),
        # a slimmer U-Net than the paper's (16 base channels instead of 64, depth 3) so a 2-core CPU
        # trains it in about a minute, and Adam: the paper's SGD with momentum 0.99 (the flow's
        # default) needs far more than the demo's 30 short epochs on so little data
        train=TrainFlowConfig(
            archive=archive, unet=UNetConfig(base_channels=16, depth=3),
            train=TrainConfig(epochs=epochs, batch_size=4, tiles_per_epoch=48, optimizer="adam", lr=1e-3, max_tile=188),
            val_fraction=0.25, tracking_uri=tracking,
        ),
        segment=SegmentConfig(archive=archive, tracking_uri=tracking, qc_dir=workdir / "qc"),
    )


def run_demo(workdir: Path, epochs: int = 30, n_volumes: int = 4) -> str:
    """Write phantoms, run the pipeline, score the held-out volume; return a report for the terminal."""
    from octseg.flows.pipeline import run_pipeline
    from octseg.flows.runs import summary_of
    from octseg.tasks.archive.store import open_archive
    from octseg.unet.metrics import dice_per_class

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    sources, truth = _write_inputs(workdir / "scans", n_volumes)
    config = _demo_config(workdir, sources, epochs)
    summary = summary_of(run_pipeline(config, return_state=True))
    prediction = np.asarray(open_archive(config.segment.archive, create=False).prediction(HELDOUT)[...])
    dice = dice_per_class(prediction, truth, num_classes=2)[1]
    minutes = (time.perf_counter() - t0) / 60
    tracking = config.train.tracking_uri
    return "\n".join([
        summary.headline(),
        "",
        f"held-out phantom volume {HELDOUT}: fluid Dice {dice:.3f}",
        f"wall time: {minutes:.1f} min",
        f"archive:     {config.segment.archive}",
        f"QC overlays: {config.segment.qc_dir}",
        "open them:",
        f"  mlflow ui --backend-store-uri {tracking}",
        f"  napari --plugin napari-ome-zarr {config.segment.archive / HELDOUT}",
    ])
