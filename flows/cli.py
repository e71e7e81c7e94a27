"""The ``octseg`` command: OCT files -> segmented OME-Zarr archive, on embedded defaults.

Every command fills its flow's one config object (:mod:`octseg.flows.config`): ``--config FILE``
(YAML or JSON) first, then the options given on the command line; ``--show-config`` prints the
result and stops. Before the Prefect engine starts, the command checks its paths, the tracking URI
and the model (:mod:`octseg.flows.preflight`): a user error is one line and exit code 2. A command
with nothing to do says so without starting a flow run. Heavy modules (prefect, torch, mlflow) are
imported inside the commands so that ``--help`` stays fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from octseg.flows import preflight
from octseg.flows.cli_options import VerboseOpt, config_command
from octseg.flows.config import (
    CatalogueConfig,
    EvaluateConfig,
    IngestConfig,
    PipelineConfig,
    PreprocessConfig,
    SegmentConfig,
    TrainFlowConfig,
    WatchConfig,
)
from octseg.flows.console import (
    one_line,
    prepare_runtime,
    quiet_third_party,
    report,
    run_flow,
)
from typer.core import TyperGroup

__all__ = ["app", "main"]

# Read by Prefect when it is first imported, so set before any command can import it. The ephemeral
# server's first start migrates its database, which outlasts Prefect's 20 s default on a small machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# MLflow's HTTP client retries 7 times with a backoff factor of 2 and waits 120 s per request by default:
# a tracking server that stops answering held a command for minutes. A few seconds of retries instead.
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")):
    os.environ.setdefault(_name, _value)


class _UserErrorGroup(TyperGroup):
    """Shows a ValueError from a command (bad input, missing model, ...) as one line, exit code 2."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except ValueError as e:
            typer.secho(f"Error: {one_line(e)}", fg=typer.colors.RED, err=True)
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
        "for all four, and [bold]octseg demo[/] to see it work on synthetic scans. [bold]octseg evaluate[/] "
        "scores a model on annotated volumes.\n\n"
        "Every command takes [bold]--config FILE[/] (YAML or JSON of its settings; options override it) and "
        "[bold]--show-config[/] (print the settings it would run with, then stop).\n\n"
        "Embedded defaults: Prefect's ephemeral server (set PREFECT_API_URL for a real one), a Dask "
        "LocalCluster (set DASK_SCHEDULER_ADDRESS or --dask-address for a cluster), MLflow in "
        "./mlflow.db with artifacts in ./mlartifacts (set MLFLOW_TRACKING_URI or --tracking-uri)."
    ),
)


# ---- the commands: options derived from each config (octseg.flows.cli_options) -------------------

def _command(cls: type, selectors: list) -> Any:
    return config_command(app, cls, selectors, before=quiet_third_party)


@_command(IngestConfig, ["*", "reader_options.*"])
def ingest(cfg: IngestConfig, verbose: bool) -> None:
    """Read OCT files into the archive: one volume per file (or per folder of B-scans).

    Files are read in parallel (threads here, or the workers of --dask-address); a file that cannot be
    read is reported with what was wrong and the others go on (exit code 1 when any failed). Unchanged
    files already in the archive are skipped. Vendor files keep their voxel size, layer boundaries,
    fundus image, laterality, scan pattern and date; patient identifiers stay out unless
    --keep-identifiers.

    Example: [bold]octseg ingest scans/*.vol exports/*.dcm --archive oct.zarr[/]
    """
    preflight.check_new_archive(cfg.archive)
    preflight.check_labels(cfg.labels)
    from octseg.flows.plans import plan_ingest

    todo, planned = plan_ingest(cfg)
    if not todo:
        return report(planned)
    from octseg.flows.ingest import ingest_config_for, ingest_volumes

    with ingest_config_for(cfg, todo) as run_cfg:
        summary = run_flow(ingest_volumes, run_cfg, verbose)
    summary.skipped = planned.skipped + summary.skipped  # found unchanged by the plan, not hashed again
    summary.failures = planned.failures + summary.failures  # duplicate ids, missing or unusable names
    report(summary)


@_command(PreprocessConfig, ["*", "weights.*"])
def preprocess(cfg: PreprocessConfig, verbose: bool) -> None:
    """Normalise intensities (ignoring the white fill) and compute U-Net border-weight maps.

    Runs on Dask over B-scans; reruns skip what is up to date.
    """
    preflight.check_archive(cfg.archive, writable=True)
    from octseg.flows.plans import plan_preprocess

    todo, summary = plan_preprocess(cfg)
    if not todo:
        return report(summary)
    from octseg.flows.preprocess import preprocess_archive

    report(run_flow(preprocess_archive, cfg, verbose))


def _registered_model(model_uri: str, tracking_uri: str | None, writes: bool = False) -> Any:
    """The pinned registered model, resolved before any flow run: a missing database, model, alias or
    version is a one-line error (exit 2), not a failed run; so is a database a command that ``writes``
    (evaluate records its score) cannot write."""
    from octseg.tasks.tracking.models import resolve_model
    from octseg.tasks.tracking.uri import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri, must_exist=True)
    if writes:
        preflight.check_tracking_writable(uri)
    return resolve_model(model_uri, uri)


@_command(TrainFlowConfig, ["*", "unet.*", "train.*"])
def train(cfg: TrainFlowConfig, verbose: bool) -> None:
    """Train a U-Net on the annotated B-scans; log to MLflow and register it as octseg-unet.

    The new version becomes the [bold]champion[/] alias when it beats the current one on validation Dice.
    A rerun with unchanged data and settings reuses the registered run instead of training again.
    Watch it with [bold]mlflow ui --backend-store-uri sqlite:///mlflow.db[/].
    """
    from octseg.tasks.tracking.uri import check_tracking_uri, resolve_tracking_uri

    preflight.check_archive(cfg.archive, writable=False)
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_uri(uri)
    preflight.check_tracking_writable(uri)
    from octseg.flows.plans import previous_training

    done = None if cfg.force or cfg.resume else previous_training(cfg, uri)
    if done is not None:
        return report(done)
    from octseg.flows.train import train_unet

    report(run_flow(train_unet, cfg, verbose))


@_command(SegmentConfig, ["*", "inference.*"])
def segment(cfg: SegmentConfig, verbose: bool) -> None:
    """Segment every volume (or those named) into labels/prediction, with QC overlays.

    Each volume is a task on Dask workers (a LocalCluster, or [bold]--dask-address[/] /
    $DASK_SCHEDULER_ADDRESS); each B-scan goes through the network whole when it fits the memory budget.
    Resumable and crash-safe: volumes already segmented by the same model version from the same image are
    skipped, a prediction is published only when complete. A per-volume CSV (B-scans, pixels per class,
    fluid volume in mm^3) is written to ARCHIVE.reports/segmentation.csv. Open the result in napari with
    [bold]napari --plugin napari-ome-zarr ARCHIVE/VOLUME[/].
    """
    preflight.check_archive(cfg.archive, writable=True)
    preflight.check_output_folder(cfg.qc_folder, "QC folder")
    preflight.check_archive_siblings(cfg.archive, "reports")
    from octseg.flows.plans import plan_segmentation, registered_version
    from octseg.flows.summary import SegmentSummary
    from octseg.tasks.tracking.uri import resolve_tracking_uri

    quick = None if cfg.force else registered_version(cfg.model_uri, resolve_tracking_uri(cfg.tracking_uri))
    if quick is not None:  # nothing to do is answered without loading MLflow
        todo, done = plan_segmentation(cfg, quick)
        if not todo:
            return report(SegmentSummary(str(cfg.archive), f"{quick.name} v{quick.version}", skipped=done,
                                          qc_dir=str(cfg.qc_folder)))
    ref = _registered_model(cfg.model_uri, cfg.tracking_uri)
    todo, done = plan_segmentation(cfg, ref)
    if not todo:
        return report(SegmentSummary(str(cfg.archive), f"{ref.name} v{ref.version}", skipped=done,
                                      qc_dir=str(cfg.qc_folder)))
    from octseg.flows.segment import segment_archive

    report(run_flow(segment_archive, cfg, verbose))


@_command(EvaluateConfig, ["*", "inference.*"])
def evaluate(cfg: EvaluateConfig, verbose: bool) -> None:
    """Score a registered model (default the champion) on the annotated B-scans of archive volumes.

    Per class and per volume: Dice, IoU, precision and recall on pooled pixels (a class absent from both
    prediction and truth scores —), pixel error and adapted Rand error. The report (Markdown and PNG plots,
    with the worst B-scans) goes to [bold]ARCHIVE.reports/[/] and into the model's MLflow run; the score is
    recorded on the model version. Predictions come from the same code as [bold]octseg segment[/].
    """
    if cfg.fix and not cfg.volumes:
        raise ValueError("--fix needs the evaluation volumes named with --volume (training holds them out)")
    preflight.check_archive(cfg.archive, writable=cfg.fix)
    preflight.check_output_folder(cfg.archive.with_name(cfg.archive.name + ".reports"), "report folder")
    _registered_model(cfg.model_uri, cfg.tracking_uri, writes=True)
    if cfg.volumes:  # a volume the archive lacks: one line here, not a failed flow run
        from octseg.tasks.archive.catalogue import catalogue_for

        catalogue_for(cfg.archive).entries(list(cfg.volumes))
    from octseg.flows.evaluate import evaluate_model

    report(run_flow(evaluate_model, cfg, verbose))


_STAGES = ("ingest", "preprocess", "train", "segment")


@_command(PipelineConfig, [
    "ingest.sources", tuple(f"{s}.archive" for s in _STAGES), "ingest.labels",
    *(f"train.unet.{k}" for k in ("out_channels", "base_channels", "depth")),
    *(f"train.train.{k}" for k in ("epochs", "batch_size", "optimizer", "lr", "tiles_per_epoch", "max_tile")),
    ("train.train.device", "segment.inference.device"), ("train.tracking_uri", "segment.tracking_uri"),
    "preprocess.dask_address"])
def pipeline(cfg: PipelineConfig, verbose: bool) -> None:
    """ingest -> preprocess -> train -> segment in one Prefect flow run.

    The options here are the common ones; every setting of every stage can be given with [bold]--config[/]
    (a YAML file with ingest, preprocess, train and segment sections; see [bold]--show-config[/]).
    """
    preflight.check_sources(cfg.ingest.sources)
    preflight.check_new_archive(cfg.ingest.archive)
    preflight.check_labels(cfg.ingest.labels)
    from octseg.tasks.tracking.uri import check_tracking_uri, resolve_tracking_uri

    preflight.check_output_folder(cfg.segment.qc_folder, "QC folder")
    preflight.check_archive_siblings(cfg.ingest.archive, "reports")
    tracking_uri = resolve_tracking_uri(cfg.train.tracking_uri)
    check_tracking_uri(tracking_uri)
    preflight.check_tracking_writable(tracking_uri)
    from octseg.flows.pipeline import run_pipeline

    report(run_flow(run_pipeline, cfg, verbose))


@_command(WatchConfig, ["*", "reader_options.keep_identifiers", "inference.device"])
def watch(cfg: WatchConfig, verbose: bool) -> None:
    """Ingest, preprocess and segment the files of a drop folder that the archive does not hold yet.

    New means: content (sha256) the archive has not ingested, and unchanged for --settle-seconds (files
    still being copied in wait for the next run). What an hourly Prefect deployment runs
    (deployments/prefect.yaml); with nothing new it answers at once, without starting a flow run.
    """
    preflight.check_sources([cfg.inbox])
    preflight.check_new_archive(cfg.archive)
    preflight.check_labels(cfg.labels)
    preflight.check_archive_siblings(cfg.archive, "qc", "reports")
    from octseg.flows.summary import WatchSummary
    from octseg.tasks.ingest.inbox import scan_inbox
    from octseg.tasks.ingest.known import read_settings

    scan = scan_inbox(cfg.inbox, cfg.archive, settle_seconds=cfg.settle_seconds, labels=cfg.labels,
                      settings=read_settings(cfg.reader_options.model_dump(), cfg.max_voxels))
    if not scan.new and not scan.unreadable:
        return report(WatchSummary(str(cfg.inbox), str(cfg.archive), known=len(scan.known),
                                    unsettled=len(scan.unsettled), known_bad=len(scan.known_bad)))
    from octseg.tasks.tracking.uri import check_tracking_uri, resolve_tracking_uri

    check_tracking_uri(resolve_tracking_uri(cfg.tracking_uri))
    from octseg.flows.watch import watch_inbox

    report(run_flow(watch_inbox, cfg, verbose))


@_command(CatalogueConfig, ["*"])
def catalogue(cfg: CatalogueConfig, verbose: bool) -> None:
    """Check the archive's catalogue against its volumes and show what it holds; --rebuild reads every volume.

    Plans (what ingest, preprocess, segment and watch would do) read the catalogue instead of every volume; a row
    whose volume changed since it was read is read again from the volume, and a missing or damaged catalogue is
    rebuilt on its own. Nothing is written into the archive.
    """
    import time

    preflight.check_archive(cfg.archive, writable=False)
    from octseg.tasks.archive.catalogue import catalogue_for  # not the archive's writers: no Zarr or Dask to import

    store = catalogue_for(cfg.archive)
    t0 = time.perf_counter()
    if cfg.rebuild:
        store.rebuild()
    entries = store.entries(verify=("volume", "prediction", "derived"))
    volumes, stale = len(entries), _stale_readings(entries.values())
    counts, models = store.counts(), store.models()
    statuses = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("segmented", "preprocessed", "ingested", "unreadable")
                         if counts.get(k) or k != "unreadable")
    by_model = "; ".join(f"{name} v{version}: {n}" for (name, version), n in sorted(models.items()))
    typer.echo(f"catalogue {store.path}: {volumes} volumes ({statuses}"
               f"{'; segmented by ' + by_model if by_model else ''}); {counts['sources']} source files known, "
               f"{counts['bad']} refused; {'rebuilt from the volumes' if cfg.rebuild else 'checked against them'} "
               f"in {time.perf_counter() - t0:.2f} s")
    if stale:
        typer.echo(f"{stale} volume(s) read under older reading rules: the next ingest of their sources reads them "
                   f"again (kept where the pixels come out the same, else written again)")


def _stale_readings(entries) -> int:
    """How many catalogue entries record a reading older than their reader's rules now (each settings row once)."""
    import json

    from octseg.tasks.ingest.rules import stale_reading

    judged: dict[tuple[str | None, str | None], bool] = {}
    for e in entries:
        key = (e.settings, e.reader)
        if key not in judged:
            judged[key] = stale_reading({**json.loads(e.settings or "{}"), "reader": e.reader}, None)
    return sum(judged[(e.settings, e.reader)] for e in entries)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Work folder for phantoms, archive, MLflow and Prefect state.")] = Path(
        "octseg-demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    volumes: Annotated[int, typer.Option(help="Annotated phantom volumes to train on.")] = 4,
    verbose: VerboseOpt = False,
) -> None:
    """Run the whole pipeline on synthetic OCT phantoms, then score a held-out phantom volume.

    Everything lives in WORKDIR: Prefect's ephemeral server state, MLflow's SQLite file and
    artifacts, the archive and QC overlays. About 2 minutes on a 2-core CPU.
    """
    quiet_third_party(verbose)
    workdir = workdir.resolve()
    os.environ.setdefault("PREFECT_HOME", str(workdir / ".prefect"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    prepare_runtime(verbose)
    from octseg.flows.demo import run_demo

    typer.echo(run_demo(workdir, epochs=epochs, n_volumes=volumes))


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
