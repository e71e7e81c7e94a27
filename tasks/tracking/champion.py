"""Which registered version is the champion (the alias ``champion``), and the scores that decide it.

Two ways to decide: right after training, by the run's own validation Dice of class
:data:`FOREGROUND` (:func:`promote_if_better`); or on an archive's fixed evaluation set, by the pooled
Dice recorded on each version per set (:func:`record_eval_score`, :func:`promote_on_evaluation`). A NaN
never wins; a champion scored NaN loses to any number.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from octseg.tasks.tracking.models import ModelRef, resolve_model
from octseg.tasks.tracking.uri import client

__all__ = ["CHAMPION", "EVAL_SCORE_TAG", "EVAL_SET_TAG", "FOREGROUND", "REGISTERED", "cached_eval_score", "champion",
           "log_evaluation_report", "metric_of", "promote_if_better", "promote_on_evaluation", "record_eval_score"]

log = logging.getLogger(__name__)

CHAMPION = "champion"
FOREGROUND = 1  # the class whose Dice decides promotion
REGISTERED = "registered_"  # metric prefix: the score of the weights a run registered


def metric_of(mlflow_client, run_id: str | None, metric: str) -> float | None:
    """``metric`` of a run; for a ``registered_*`` metric that a run of an earlier octseg lacks, its last
    per-epoch value (what those runs registered)."""
    if run_id is None:
        return None
    metrics = mlflow_client.get_run(run_id).data.metrics
    value = metrics.get(metric)
    if value is None and metric.startswith(REGISTERED):
        value = metrics.get(metric.removeprefix(REGISTERED))
    return value


def promote_if_better(
    name: str,
    version: str | int,
    score: float,
    tracking_uri: str,
    alias: str = CHAMPION,
    *,
    metric: str,
) -> bool:
    """Point ``alias`` at ``version`` if there is no champion or ``score`` beats its ``metric``; True if moved.

    The champion's score is the last value of ``metric`` in the run that produced it. A NaN score never
    beats a champion; a champion whose score is NaN loses to any finite score; a champion without
    ``metric`` is kept (the scores are not comparable) and a warning says so.
    """
    mlflow_client = client(tracking_uri)
    aliases = mlflow_client.get_registered_model(name).aliases  # stores differ in how a missing alias fails
    current = mlflow_client.get_model_version(name, aliases[alias]) if alias in aliases else None
    if current is not None:
        if str(current.version) == str(version):
            return False
        best = metric_of(mlflow_client, current.run_id, metric)
        if best is None:
            log.warning("%s@%s (v%s) has no metric %r: keeping it", name, alias, current.version, metric)
            return False
        if math.isnan(score) or not (math.isnan(best) or score > best):
            log.info("%s v%s: %s %.4f does not beat %s@%s (v%s) %.4f",
                     name, version, metric, score, name, alias, current.version, best)
            return False
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    log.info("%s v%s is now %s@%s (%s %.4f)", name, version, name, alias, metric, score)
    return True


EVAL_SET_TAG = "octseg.eval_set"  # fingerprint of the evaluation set of the version's latest evaluation
EVAL_SCORE_TAG = "octseg.eval_score"  # its pooled foreground Dice


def _score_tag(fingerprint: str) -> str:
    return f"{EVAL_SCORE_TAG}.{fingerprint[:16]}"


def cached_eval_score(ref: ModelRef, fingerprint: str, tracking_uri: str) -> float | None:
    """The score of version ``ref`` on the evaluation set ``fingerprint`` recorded earlier, or None."""
    tags = client(tracking_uri).get_model_version(ref.name, ref.version).tags
    value = tags.get(_score_tag(fingerprint))
    return None if value is None else float(value)


def record_eval_score(ref: ModelRef, fingerprint: str, score: float, tracking_uri: str,
                      report_dir: str | Path | None = None) -> None:
    """Record on the version its score on the evaluation set (``octseg.eval_set``, ``octseg.eval_score``
    and a per-set ``octseg.eval_score.<fp16>`` that caches it) and log the report into the version's run
    under ``evaluation/<fp16>/``."""
    mlflow_client = client(tracking_uri)
    for key, value in ((EVAL_SET_TAG, fingerprint), (EVAL_SCORE_TAG, repr(float(score))),
                       (_score_tag(fingerprint), repr(float(score)))):
        mlflow_client.set_model_version_tag(ref.name, ref.version, key, value)
    if report_dir is not None:
        log_evaluation_report(ref, fingerprint, tracking_uri, report_dir)


def log_evaluation_report(ref: ModelRef, fingerprint: str, tracking_uri: str, report_dir: str | Path) -> None:
    """Log the report of an evaluation into the version's run under ``evaluation/<fp16>/``."""
    if ref.run_id:
        client(tracking_uri).log_artifacts(ref.run_id, str(report_dir), artifact_path=f"evaluation/{fingerprint[:16]}")


def champion(name: str, tracking_uri: str, alias: str = CHAMPION) -> ModelRef | None:
    """The version ``alias`` points at, resolved, or None when there is none yet."""
    if alias not in client(tracking_uri).get_registered_model(name).aliases:
        return None
    return resolve_model(f"models:/{name}@{alias}", tracking_uri)


def promote_on_evaluation(ref: ModelRef, score: float, current: ModelRef | None, current_score: float | None,
                          tracking_uri: str, alias: str = CHAMPION) -> bool:
    """Point ``alias`` at ``ref`` when there is no champion or ``score`` beats the champion's score on the
    same evaluation set; True if moved. A NaN never wins; a champion scored NaN loses to any number."""
    if current is not None:
        if current.version == ref.version:
            return False
        if math.isnan(score) or not (current_score is None or math.isnan(current_score) or score > current_score):
            log.info("%s v%s: evaluation Dice %.4f does not beat %s@%s (v%s) %.4f", ref.name, ref.version, score,
                     ref.name, alias, current.version, current_score)
            return False
    client(tracking_uri).set_registered_model_alias(ref.name, alias, ref.version)
    log.info("%s v%s is now %s@%s (evaluation Dice %.4f)", ref.name, ref.version, ref.name, alias, score)
    return True
