"""The ``octseg`` command: OCT files -> segmented OME-Zarr archive, on embedded defaults.

Heavy modules (prefect, torch, mlflow) are imported inside the commands so ``--help`` stays fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup


def _one_line(error: ValueError) -> str:
    """The error as one line; a pydantic ValidationError as ``field: message; ...``."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
    return " ".join(str(error).splitlines())


class _UserErrorGroup(TyperGroup):
    """Shows a ValueError from a command (bad input, missing model, ...) as one line, exit code 2."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except ValueError as e:
            typer.secho(f"Error: {_one_line(e)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from e


app = typer.Typer(
    name="octseg",
    cls=_UserErrorGroup,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help=(
        "Segment retinal OCT archives with the U-Net of Ronneberger et al. 2015.\n\n"
        "Typical session: [bold]octseg ingest[/] scans into an archive, [bold]octseg preprocess[/] it, "
        "[bold]octseg train[/] a model, [bold]octseg segment[/] the archive — or [bold]octseg pipeline[/] "
        "for all four, and [bold]octseg demo[/] to see it work on synthetic scans.\n\n"
        "Embedded defaults: Prefect's ephemeral server (set PREFECT_API_URL for a real one), a Dask "
        "LocalCluster (set DASK_SCHEDULER_ADDRESS or --dask-address for a cluster), MLflow in "
        "./mlflow.db with artifacts in ./mlartifacts (set MLFLOW_TRACKING_URI or --tracking-uri)."
    ),
)

ArchiveOpt = Annotated[Path, typer.Option("--archive", "-a", help="The OME-Zarr archive (a folder, created by ingest).")]
VolumesOpt = Annotated[Optional[list[str]], typer.Option("--volume", "-v", help="Only this volume id (repeatable). Default: all.")]
TrackingOpt = Annotated[Optional[str], typer.Option(help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db.")]
DaskOpt = Annotated[Optional[str], typer.Option(help="Dask scheduler (tcp://host:8786). Default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (GPU when present), cpu or cuda.")]
SourcesArg = Annotated[list[Path], typer.Argument(metavar="SOURCE", help="TIFF stacks, .npy files, 2-D images, or folders of 2-D B-scans (one folder = one volume).", show_default=False)]
LabelsOpt = Annotated[Optional[Path], typer.Option(help="Folder of manual masks with the same file names as the sources.")]


def _echo_summary(summary, failures: list[str] | None = None) -> None:
    typer.secho(summary.headline(), fg=typer.colors.GREEN if not failures else typer.colors.YELLOW)
    for f in failures or []:
        typer.secho(f"  failed: {f}", fg=typer.colors.RED, err=True)


def _fail_on(failures: list[str]) -> None:
    if failures:
        raise typer.Exit(code=1)


@app.command()
def ingest(sources: SourcesArg, archive: ArchiveOpt, labels: LabelsOpt = None) -> None:
    """Read OCT files into the archive: one volume per file (or per folder of B-scans).

    Files are read in parallel; a file that cannot be read is reported with what was wrong and the
    others go on (exit code 1 when any failed). Unchanged files already in the archive are skipped.

    Example: [bold]octseg ingest scans/*.tif --labels scans/masks --archive oct.zarr[/]
    """
    from octseg.flows.config import IngestConfig
    from octseg.flows.ingest import ingest_volumes

    summary = ingest_volumes(IngestConfig(sources=tuple(sources), archive=archive, labels=labels))
    _echo_summary(summary, summary.failures)
    _fail_on(summary.failures)


@app.command()
def preprocess(
    archive: ArchiveOpt,
    volume: VolumesOpt = None,
    dask_address: DaskOpt = None,
    workers: Annotated[int, typer.Option(help="LocalCluster worker processes.")] = 2,
    w0: Annotated[float, typer.Option(help="Border weight w0 of the paper.")] = 10.0,
    sigma: Annotated[float, typer.Option(help="Border weight sigma (pixels).")] = 5.0,
    balanced: Annotated[bool, typer.Option("--balanced/--no-balanced", help="Class weights w_c by inverse class frequency (the paper's w_c); default w_c = 1.")] = False,
) -> None:
    """Normalise intensities (ignoring the white fill) and compute U-Net border-weight maps.

    Runs on Dask over B-scans; reruns skip what is up to date.
    """
    from octseg.flows.config import PreprocessConfig
    from octseg.flows.preprocess import preprocess_archive

    cfg = PreprocessConfig(
        archive=archive, volumes=tuple(volume) if volume else None, n_workers=workers, w0=w0, sigma=sigma,
        class_weights="balanced" if balanced else None,
        **({"dask_address": dask_address} if dask_address else {}),
    )
    summary = preprocess_archive(cfg)
    _echo_summary(summary, summary.failures)
    _fail_on(summary.failures)


def _train_config(archive: Path, volume, **kw):
    from octseg.flows.config import TrainFlowConfig

    kw = {k: v for k, v in kw.items() if v is not None}
    return TrainFlowConfig(archive=archive, volumes=tuple(volume) if volume else None, **kw)


EpochsOpt = Annotated[int, typer.Option(help="Training epochs.")]
BaseOpt = Annotated[int, typer.Option(help="Channels of the first level (the paper: 64).")]
DepthOpt = Annotated[int, typer.Option(help="Number of 2x2 max-poolings (the paper: 4).")]
BatchOpt = Annotated[int, typer.Option(help="Tiles per optimisation step.")]
LrOpt = Annotated[float, typer.Option(help="Learning rate.")]
OptimOpt = Annotated[str, typer.Option(help="sgd (the paper's, momentum 0.99) or adam.")]
TilesOpt = Annotated[int, typer.Option(help="Random tiles drawn per epoch.")]


@app.command()
def train(
    archive: ArchiveOpt,
    volume: VolumesOpt = None,
    epochs: EpochsOpt = 20,
    base_channels: BaseOpt = 64,
    depth: DepthOpt = 4,
    batch_size: BatchOpt = 4,
    lr: LrOpt = 0.01,
    optimizer: OptimOpt = "sgd",
    tiles_per_epoch: TilesOpt = 64,
    device: DeviceOpt = "auto",
    tracking_uri: TrackingOpt = None,
    force: Annotated[bool, typer.Option(help="Train even if an identical run (same data and settings) is registered.")] = False,
) -> None:
    """Train a U-Net on the annotated B-scans; log to MLflow and register it as octseg-unet.

    The new version becomes the [bold]champion[/] alias when it beats the current one on validation Dice.
    A rerun with unchanged data and settings reuses the registered run instead of training again.
    Watch it with [bold]mlflow ui --backend-store-uri sqlite:///mlflow.db[/].
    """
    from octseg.flows.train import train_unet

    cfg = _train_config(archive, volume, epochs=epochs, base_channels=base_channels, depth=depth,
                        batch_size=batch_size, lr=lr, optimizer=optimizer, tiles_per_epoch=tiles_per_epoch,
                        device=device, tracking_uri=tracking_uri, force=force)
    _echo_summary(train_unet(cfg))


@app.command()
def segment(
    archive: ArchiveOpt,
    model: Annotated[str, typer.Option(help="Model URI: models:/NAME@ALIAS or models:/NAME/VERSION.")] = "models:/octseg-unet@champion",
    volume: VolumesOpt = None,
    device: DeviceOpt = "auto",
    tracking_uri: TrackingOpt = None,
    qc_dir: Annotated[Optional[Path], typer.Option(help="Where QC overlays go. Default: <archive>.qc")] = None,
    force: Annotated[bool, typer.Option(help="Re-segment volumes this model version already did.")] = False,
) -> None:
    """Segment every volume (or those named) into labels/prediction, with QC overlays.

    Resumable: volumes already segmented by the same model version are skipped. Open the result in
    napari with [bold]napari --plugin napari-ome-zarr ARCHIVE/VOLUME[/].
    """
    from octseg.flows.config import SegmentConfig
    from octseg.flows.segment import segment_archive
    from octseg.tasks.tracking import resolve_model, resolve_tracking_uri

    resolve_model(model, resolve_tracking_uri(tracking_uri))  # a missing model is a one-line error, not a failed run
    cfg = SegmentConfig(archive=archive, model_uri=model, volumes=tuple(volume) if volume else None,
                        device=device, tracking_uri=tracking_uri, qc_dir=qc_dir, force=force)
    summary = segment_archive(cfg)
    _echo_summary(summary, summary.failures)
    _fail_on(summary.failures)


@app.command()
def pipeline(
    sources: SourcesArg,
    archive: ArchiveOpt,
    labels: LabelsOpt = None,
    epochs: EpochsOpt = 20,
    base_channels: BaseOpt = 64,
    depth: DepthOpt = 4,
    batch_size: BatchOpt = 4,
    lr: LrOpt = 0.01,
    optimizer: OptimOpt = "sgd",
    tiles_per_epoch: TilesOpt = 64,
    device: DeviceOpt = "auto",
    tracking_uri: TrackingOpt = None,
    dask_address: DaskOpt = None,
) -> None:
    """ingest -> preprocess -> train -> segment in one Prefect flow run."""
    from octseg.flows.config import IngestConfig, PipelineConfig, PreprocessConfig, SegmentConfig
    from octseg.flows.pipeline import run_pipeline

    dask = {"dask_address": dask_address} if dask_address else {}
    cfg = PipelineConfig(
        ingest=IngestConfig(sources=tuple(sources), archive=archive, labels=labels),
        preprocess=PreprocessConfig(archive=archive, **dask),
        train=_train_config(archive, None, epochs=epochs, base_channels=base_channels, depth=depth,
                            batch_size=batch_size, lr=lr, optimizer=optimizer, tiles_per_epoch=tiles_per_epoch,
                            device=device, tracking_uri=tracking_uri),
        segment=SegmentConfig(archive=archive, device=device, tracking_uri=tracking_uri),
    )
    summary = run_pipeline(cfg)
    typer.echo(summary.headline())
    _fail_on(summary.ingest.failures + summary.preprocess.failures + summary.segment.failures)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Work folder for phantoms, archive, MLflow and Prefect state.")] = Path("octseg-demo"),
    epochs: EpochsOpt = 30,
    volumes: Annotated[int, typer.Option(help="Annotated phantom volumes to train on.")] = 4,
) -> None:
    """Run the whole pipeline on synthetic OCT phantoms, then score a held-out phantom volume.

    Everything lives in WORKDIR: Prefect's ephemeral server state, MLflow's SQLite file and
    artifacts, the archive and QC overlays. About 2 minutes on a 2-core CPU.
    """
    workdir = workdir.resolve()
    os.environ.setdefault("PREFECT_HOME", str(workdir / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from octseg.flows.demo import run_demo

    report = run_demo(workdir, epochs=epochs, n_volumes=volumes)
    typer.echo(report)


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
