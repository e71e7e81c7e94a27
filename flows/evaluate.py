"""Flow ``evaluate-model``: a registered U-Net scored on the annotated B-scans of archive volumes."""
from __future__ import annotations

import math

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import EvaluateConfig
from octseg.flows.runs import Outcomes, finish
from octseg.flows.summary import EvaluateSummary
from octseg.tasks.archive.store import open_archive, select_volumes
from octseg.tasks.archive.classes import class_names_of
from octseg.tasks.segmentation.evaluation import (
    evaluate_volume_task,
    evaluation_fingerprint,
    report_folder,
    seen_in_training,
    summarize,
    write_report,
)
from octseg.tasks.tracking.champion import log_evaluation_report, record_eval_score
from octseg.tasks.tracking.models import ModelRef, resolve_model
from octseg.tasks.tracking.uri import resolve_tracking_uri
from octseg.unet.config import UNetConfig

__all__ = ["evaluation_volumes", "evaluate_model"]


def evaluation_volumes(config: EvaluateConfig, ref: ModelRef) -> tuple[list[str], list[str], list[str]]:
    """(volumes to score, annotated volumes left out, volumes scored that trained ``ref``): the named volumes,
    else the archive's fixed evaluation set, else every annotated volume that did not train ``ref`` (ValueError
    when they all did)."""
    archive = open_archive(config.archive, create=False)
    chosen = config.volumes if config.volumes is not None else (archive.evaluation_set() or None)
    if chosen is not None:
        volumes = select_volumes(config.archive, chosen)
        return volumes, [], seen_in_training(ref, config.archive, volumes)
    annotated = [v for v in archive.volume_ids() if (archive.manual_labels(v) or (None, []))[1]]
    if not annotated:
        raise ValueError(f"{config.archive}: no volume with manual labels to evaluate on; ingest with --labels")
    seen = set(seen_in_training(ref, config.archive, annotated))
    held = [v for v in annotated if v not in seen]
    if not held:
        raise ValueError(f"{config.archive}: every annotated volume ({len(annotated)}) trained {ref.name} v{ref.version}"
                         f", so none scores it on unseen scans; ingest held-out volumes, or name volumes with -v to "
                         f"score it on its training data (the report then says so)")
    return held, sorted(seen), []


@flow(name="evaluate-model")
def evaluate_model(config: EvaluateConfig) -> State:
    """Resolve the model, score each volume in its own task run, pool the scores, write the report
    beside the archive and into the model's MLflow run, and record the score on the model version."""
    logger = get_run_logger()
    logger.info("evaluate config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    ref = resolve_model(config.model_uri, tracking_uri)
    volumes, left_out, trained_on = evaluation_volumes(config, ref)
    if left_out:
        logger.info("left out %d annotated volumes that trained %s v%s: %s", len(left_out), ref.name, ref.version,
                    left_out)
    if ref.trained_on is None:
        logger.warning("%s v%s records no training volumes (registered before octseg recorded them): the volumes "
                       "scored may include some that trained it", ref.name, ref.version)
    if trained_on:
        logger.warning("%d of the volumes trained %s v%s (not held out): %s; the score is no held-out score and is "
                       "not recorded on the version", len(trained_on), ref.name, ref.version, trained_on)
    if config.fix:
        open_archive(config.archive, create=False).set_evaluation_set(volumes)
        logger.info("fixed %s as the evaluation set of %s", volumes, config.archive)
    fingerprint = evaluation_fingerprint(config.archive, volumes, config.inference)
    model = f"{ref.name} v{ref.version}"
    summary = EvaluateSummary(str(config.archive), model, fingerprint)
    outcomes = Outcomes(logger)
    for vid in volumes:
        outcomes.add(vid, evaluate_volume_task(str(config.archive), vid, ref, tracking_uri, config.inference,
                                               return_state=True))
    results = outcomes.results
    summary.failures += outcomes.failures
    if results:
        names = class_names_of(UNetConfig.from_dict(ref.unet_config).out_channels)
        trained_on = [v for v in trained_on if v in {r.volume_id for r in results}]  # of those scored
        report = summarize(model, fingerprint, results, names, trained_on)
        folder = report_folder(config.archive, model, fingerprint)
        write_report(report, folder)
        if trained_on:  # the report goes to the version's run; its score decides nothing
            log_evaluation_report(ref, fingerprint, tracking_uri, folder)
        elif not summary.failures:  # a score on part of the set is not the set's score
            record_eval_score(ref, fingerprint, report.score, tracking_uri, folder)
        summary.volumes = [r.volume_id for r in results]
        summary.dice = {names[c]: d for c, d in enumerate(report.scores["dice"]) if not math.isnan(d)}
        summary.per_volume = {v: d[names[1]] for v, d in report.per_volume().items()}
        summary.interval = tuple(report.scores["dice_interval"])
        summary.false_alarms = (report.scores["false_alarms"], report.scores["empty_bscans"])
        summary.report = str(folder)
        summary.trained_on = report.trained_on
    logger.info(summary.headline())
    return finish(summary)
