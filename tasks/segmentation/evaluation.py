"""Scoring a U-Net against the manual labels of archive volumes, and the report that says how it did.

Only the annotated B-scans of a volume are scored. Predictions come from the same code path as
``octseg segment`` (:func:`octseg.unet.inference.segment_volume` on the normalised image with an
``InferenceConfig``). Scores are pooled: each volume contributes its confusion matrix and the set's
scores come from their sum (the empty-class rule of :mod:`octseg.unet.metrics`: NaN where a class
is absent from prediction and truth). The adapted Rand error (ISBI 2012) is computed per annotated
B-scan on the connected components of the foreground (label > 0), ignoring truth background, and
averaged over the B-scans whose truth has foreground; it is meant for membrane-style data.

An evaluation set is identified by a fingerprint of its volumes' images and labels and of the tile
rule, so a score can be cached on a registered model version and compared only with scores on the
same set (:func:`evaluation_fingerprint`).
"""
from __future__ import annotations

import hashlib
import logging
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from octseg.tasks.archive.store import open_archive
from octseg.tasks.archive.classes import class_names_of
from octseg.tasks.preprocess.normalized import normalized_bscans
from octseg.tasks.tracking.champion import cached_eval_score, record_eval_score
from octseg.tasks.tracking.models import cached_unet, ModelRef
from octseg.tasks.runtime.retry import TRANSIENT_IO_RETRIES
from octseg.unet.config import InferenceConfig
from octseg.unet.crossval import bootstrap_interval
from octseg.unet.metrics import adapted_rand_error, confusion_matrix, dice_per_class, scores_from_confusion

__all__ = [
    "EvaluationReport",
    "VolumeEvaluation",
    "evaluate_volume",
    "choose_champion",
    "choose_champion_task",
    "evaluation_fingerprint",
    "evaluate_volume_task",
    "held_out",
    "report_folder",
    "score_on_evaluation_set",
    "seen_in_training",
    "summarize",
    "write_report",
]

log = logging.getLogger(__name__)

WORST_KEPT = 4  # B-scans per volume kept for the QC panel of the worst B-scans
HELD_OUT_TAG = "octseg.held_out"  # run tag: the JSON list of evaluation volumes training held out


@dataclass
class VolumeEvaluation:
    """One volume's scores on its annotated B-scans; ``worst`` holds (z, image, truth, prediction)."""

    volume_id: str
    annotated: list[int]
    confusion: np.ndarray  # (K, K) int64, [prediction, truth]
    bscan_dice: list[float]  # foreground (class 1) Dice per annotated B-scan, NaN where both are empty
    rand_error: float  # mean adapted Rand error over annotated B-scans with foreground; NaN if none
    empty_bscans: int = 0  # annotated B-scans without foreground (class > 0) in the truth
    false_alarms: int = 0  # of those, B-scans where foreground was predicted
    worst: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)


def evaluation_fingerprint(archive_path: str | Path, volume_ids: Sequence[str], inference: InferenceConfig) -> str:
    """sha256 naming an evaluation set: its volumes' source bytes and manual labels, the tile rule (tile
    size, cap, overlap) and the precision (bf16 changes predictions); device and batch size do not."""
    archive = open_archive(archive_path, create=False)
    parts = []
    for vid in sorted(set(volume_ids)):
        meta = archive.volume_meta(vid)
        labels_fp = archive.labels_fingerprint(vid, meta)
        if labels_fp is None:
            raise ValueError(f"{vid}: no manual labels; an evaluation set needs annotated volumes")
        parts.append([vid, meta.get("source_sha256"), labels_fp])
    rule = {"tile_size": inference.tile_size, "max_tile": inference.max_tile, "overlap": inference.overlap,
            "amp": inference.amp, "tta": inference.tta, "whole": inference.whole}
    return hashlib.sha256(json.dumps([parts, rule], sort_keys=True).encode()).hexdigest()


def _rand_error(pred: np.ndarray, truth: np.ndarray) -> float:
    from skimage.measure import label

    errors = [adapted_rand_error(label(p > 0), label(t > 0)) for p, t in zip(pred, truth) if (t > 0).any()]
    return float(np.mean(errors)) if errors else math.nan


def evaluate_volume(
    archive_path: str | Path,
    volume_id: str,
    model,
    inference: InferenceConfig,
    progress: Callable[[int, int], None] | None = None,
) -> VolumeEvaluation:
    """Segment the annotated B-scans of ``volume_id`` with ``model`` and score them against the truth."""
    archive = open_archive(archive_path, create=False)
    manual = archive.manual_labels(volume_id)
    if manual is None or not manual[1]:
        raise ValueError(f"{volume_id}: no annotated B-scans to evaluate on")
    from octseg.unet.inference import segment_volume

    labels, annotated = manual
    idx = sorted(annotated)
    k = model.config.out_channels
    truth = np.asarray(labels.get_orthogonal_selection((idx,)))
    if int(truth.max()) >= k:
        raise ValueError(f"{volume_id}: the manual labels hold class {int(truth.max())} but the model predicts "
                         f"{k} classes")
    pred = segment_volume(model, normalized_bscans(archive, volume_id, idx), inference, progress=progress)
    dice = [float(dice_per_class(p, t, k)[1]) for p, t in zip(pred, truth)]
    errors = [int(np.sum(p != t)) for p, t in zip(pred, truth)]
    order = sorted(range(len(idx)), key=lambda i: (-errors[i], i))[:WORST_KEPT]
    image = archive.image(volume_id)
    worst = [(idx[i], np.asarray(image[idx[i]]), truth[i], pred[i]) for i in order]
    empty = ~(truth > 0).reshape(len(truth), -1).any(axis=1)
    alarms = int(((pred > 0).reshape(len(pred), -1).any(axis=1) & empty).sum())
    return VolumeEvaluation(volume_id, idx, confusion_matrix(pred, truth, k), dice, _rand_error(pred, truth),
                            int(empty.sum()), alarms, worst)


@dataclass
class EvaluationReport:
    """The scores of one model on one evaluation set."""

    model: str  # "name vN"
    fingerprint: str
    class_names: dict[int, str]
    volumes: list[VolumeEvaluation]
    scores: dict[str, Any]  # pooled: per-class dice/iou/precision/recall lists, pixel_error, rand_error
    trained_on: list[str] = field(default_factory=list)  # scored volumes that trained the model (not held out)

    @property
    def score(self) -> float:
        """Pooled Dice of the foreground class 1: what decides the champion."""
        return float(self.scores["dice"][1])

    def per_volume(self) -> dict[str, dict[str, float]]:
        """Volume id -> per-class Dice (pooled over that volume's annotated B-scans)."""
        return {v.volume_id: {self.class_names[c]: float(d) for c, d in
                              enumerate(scores_from_confusion(v.confusion)["dice"])} for v in self.volumes}


def seen_in_training(ref: ModelRef, archive_path: str | Path, volume_ids: Sequence[str]) -> list[str]:
    """Those of ``volume_ids`` that trained registered version ``ref`` or chose its epoch: the same scan (its
    source's SHA-256, in this archive or any other), or the same volume id where a SHA-256 is unknown.
    [] for a model that records none (registered before octseg recorded them)."""
    from octseg.tasks.archive.catalogue import catalogue_for

    if not ref.trained_on:
        return []
    digests = {sha for sha in ref.trained_on.values() if sha}
    entries = catalogue_for(archive_path).entries(list(volume_ids), missing_ok=True)
    seen = []
    for v in volume_ids:
        sha = entries[v].source_sha256 if v in entries else None
        if (sha and sha in digests) or (v in ref.trained_on and not (sha and ref.trained_on[v])):
            seen.append(v)
    return seen


def summarize(model: str, fingerprint: str, volumes: list[VolumeEvaluation],
              class_names: Mapping[int, str], trained_on: Sequence[str] = ()) -> EvaluationReport:
    """Pool the volumes' confusion matrices into the set's scores; ``trained_on``: those of the volumes that
    trained the model (the report says the score is then no held-out score)."""
    if not volumes:
        raise ValueError("no volume could be evaluated")
    scores = scores_from_confusion(sum(v.confusion for v in volumes))
    rand = [v.rand_error for v in volumes if not math.isnan(v.rand_error)]
    pooled = {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in scores.items()}
    pooled["rand_error"] = float(np.mean(rand)) if rand else math.nan
    # volumes are subjects: the class-1 Dice resampled over them (bootstrap 95% interval), and false alarms
    counts = np.array([[c[1, 1], c[1].sum() - c[1, 1], c[:, 1].sum() - c[1, 1]] for c in
                       (v.confusion for v in volumes)]) if len(class_names) > 1 else np.zeros((len(volumes), 3))
    pooled["dice_interval"] = list(bootstrap_interval(counts)) if len(volumes) > 1 else [math.nan, math.nan]
    pooled["empty_bscans"] = sum(v.empty_bscans for v in volumes)
    pooled["false_alarms"] = sum(v.false_alarms for v in volumes)
    return EvaluationReport(model, fingerprint, dict(class_names), volumes, pooled, sorted(trained_on))


def _json_safe(value: Any) -> Any:
    """NaN (the empty-class rule) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _markdown(report: EvaluationReport) -> str:
    names = report.class_names
    lines = [f"# Evaluation of {report.model}", "",
             f"Evaluation set `{report.fingerprint[:16]}`: {len(report.volumes)} volumes, "
             f"{sum(len(v.annotated) for v in report.volumes)} annotated B-scans. Scores pool the pixels of "
             "all annotated B-scans; — means the score's denominator is 0 (Dice, IoU: the class is absent from "
             "prediction and truth; precision: never predicted; recall: not in the truth).", "",
             "| class | Dice | IoU | precision | recall |", "|---|---|---|---|---|"]
    if report.trained_on:
        lines[3:3] = [f"**Not a held-out score**: {len(report.trained_on)} of these volumes trained the model (or "
                      f"chose its epoch): {', '.join(report.trained_on)}.", ""]
    for c, name in names.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(report.scores[m][c]) for m in
                                                ("dice", "iou", "precision", "recall")) + " |")
    lo, hi = report.scores.get("dice_interval", [math.nan, math.nan])
    fg = names.get(1, "class 1")
    lines += ["", f"Pooled Dice {fg} {_fmt(report.score)}, 95% interval over volumes (subjects resampled with "
              f"replacement) {_fmt(lo)}-{_fmt(hi)}; {fg} predicted in {report.scores.get('false_alarms', 0)} of "
              f"{report.scores.get('empty_bscans', 0)} annotated B-scans without it."]
    lines += ["", f"Pixel error {_fmt(report.scores['pixel_error'])}; adapted Rand error "
              f"{_fmt(report.scores['rand_error'])} (foreground components; for membrane-style data).", "",
              "| volume | annotated B-scans | " + " | ".join(f"Dice {n}" for n in names.values()) + " |",
              "|---|---|" + "---|" * len(names)]
    for vid, dice in report.per_volume().items():
        n = next(len(v.annotated) for v in report.volumes if v.volume_id == vid)
        lines.append(f"| {vid} | {n} | " + " | ".join(_fmt(d) for d in dice.values()) + " |")
    lines += ["", "![per-volume Dice](per_volume_dice.png)", "",
              "Worst B-scans (most wrong pixels; truth left, prediction right):", "", "![worst](worst_bscans.png)", ""]
    return "\n".join(lines)


def write_report(report: EvaluationReport, folder: str | Path) -> list[Path]:
    """``report.md``, ``scores.json``, ``per_volume_dice.png`` and ``worst_bscans.png`` in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from octseg.tasks.segmentation.qc import side_by_side

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_volume = report.per_volume()
    fg = report.class_names[1]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(per_volume) + 2), 3))
    values = [per_volume[v][fg] for v in per_volume]
    ax.bar(range(len(values)), [0 if math.isnan(x) else x for x in values], color="tab:red")
    ax.set_xticks(range(len(values)), list(per_volume), rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"Dice {fg}")
    ax.set_title(f"{report.model}: pooled Dice {fg} {_fmt(report.score)}")
    fig.tight_layout()
    fig.savefig(folder / "per_volume_dice.png", dpi=100)
    plt.close(fig)
    worst = sorted(((int(np.sum(t != p)), v.volume_id, z, img, t, p) for v in report.volumes
                    for z, img, t, p in v.worst), key=lambda w: (-w[0], w[1], w[2]))[:WORST_KEPT]
    fig, axes = plt.subplots(len(worst), 1, figsize=(8, 2.6 * len(worst)), squeeze=False)
    for ax, (n_wrong, vid, z, img, t, p) in zip(axes[:, 0], worst):
        ax.imshow(side_by_side(img, t.astype(np.int64), p.astype(np.int64)))
        ax.set_title(f"{vid} B-scan {z}: {n_wrong} wrong pixels", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "worst_bscans.png", dpi=100)
    plt.close(fig)
    (folder / "report.md").write_text(_markdown(report))
    scores = {"model": report.model, "evaluation_set": report.fingerprint, "scores": report.scores,
              "per_volume_dice": per_volume, "class_names": report.class_names, "trained_on": report.trained_on}
    (folder / "scores.json").write_text(json.dumps(_json_safe(scores), indent=2, allow_nan=False))
    return [folder / n for n in ("report.md", "scores.json", "per_volume_dice.png", "worst_bscans.png")]


def report_folder(archive_path: str | Path, model: str, fingerprint: str) -> Path:
    """Where a report goes: ``<archive>.reports/<model name>-v<version>-<set fp12>/`` beside the archive."""
    archive = Path(archive_path)
    return archive.with_name(archive.name + ".reports") / f"{model.replace(' ', '-')}-{fingerprint[:12]}"


def score_on_evaluation_set(archive_path: str | Path, volume_ids: Sequence[str], ref: ModelRef, tracking_uri: str,
                            inference: InferenceConfig) -> tuple[float, str]:
    """(pooled foreground Dice of registered version ``ref`` on the set, the set's fingerprint).

    A score recorded earlier on the version for the same set is reused; otherwise the set is evaluated
    (report beside the archive and in the version's run) and the score recorded on the version.
    """
    fingerprint = evaluation_fingerprint(archive_path, volume_ids, inference)
    cached = cached_eval_score(ref, fingerprint, tracking_uri)
    if cached is not None:
        return cached, fingerprint
    model = cached_unet(ref, tracking_uri, inference.device)
    volumes = [evaluate_volume(archive_path, v, model, inference) for v in sorted(volume_ids)]
    report = summarize(f"{ref.name} v{ref.version}", fingerprint, volumes,
                       class_names_of(model.config.out_channels))
    folder = report_folder(archive_path, report.model, fingerprint)
    write_report(report, folder)
    record_eval_score(ref, fingerprint, report.score, tracking_uri, folder)
    return report.score, fingerprint



@task(name="evaluate-volume", task_run_name="evaluate-{volume_id}", cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def evaluate_volume_task(archive_path: str, volume_id: str, ref: ModelRef, tracking_uri: str,
                         inference: InferenceConfig) -> VolumeEvaluation:
    """Prefect wrapper of :func:`evaluate_volume`; a volume that cannot be scored fails this task run."""
    result = evaluate_volume(archive_path, volume_id, cached_unet(ref, tracking_uri, inference.device), inference)
    get_run_logger().info("%s: foreground Dice per B-scan %s", volume_id, [round(d, 3) for d in result.bscan_dice])
    return result


def choose_champion(archive_path: str | Path, volume_ids: Sequence[str], name: str, version: str,
                    tracking_uri: str, inference: InferenceConfig) -> dict[str, Any]:
    """Score version ``version`` and the current champion on the evaluation set (each score cached on
    its version per set) and move the champion alias only when the new version scores better.

    Returns ``score``, ``fingerprint``, ``promoted`` and ``champion`` (the champion's version after).
    """
    from octseg.tasks.tracking.champion import champion, promote_on_evaluation
    from octseg.tasks.tracking.models import resolve_model

    ref = resolve_model(f"models:/{name}/{version}", tracking_uri)
    score, fingerprint = score_on_evaluation_set(archive_path, volume_ids, ref, tracking_uri, inference)
    current = champion(name, tracking_uri)
    current_score = None
    if current is not None and current.version != ref.version:
        if held_out(current, tracking_uri) >= set(volume_ids) and not seen_in_training(current, archive_path, volume_ids):
            current_score, _ = score_on_evaluation_set(archive_path, volume_ids, current, tracking_uri, inference)
        else:  # it trained on (some of) the set: its score there would be a training score
            log.warning("%s@champion (v%s) did not hold out the evaluation set %s: not comparable, replaced",
                        name, current.version, sorted(volume_ids))
            current_score = math.nan
    promoted = promote_on_evaluation(ref, score, current, current_score, tracking_uri)
    after = ref.version if promoted or current is None else current.version
    return {"score": score, "fingerprint": fingerprint, "promoted": promoted, "champion": after}


def held_out(ref: ModelRef, tracking_uri: str) -> set[str]:
    """The evaluation volumes the run of registered version ``ref`` held out of its training."""
    from octseg.tasks.tracking.uri import client

    if not ref.run_id:
        return set()
    return set(json.loads(client(tracking_uri).get_run(ref.run_id).data.tags.get(HELD_OUT_TAG, "[]")))


@task(name="choose-champion", cache_policy=NO_CACHE)
def choose_champion_task(archive_path: str, volume_ids: list[str], name: str, version: str, tracking_uri: str,
                         inference: InferenceConfig) -> dict[str, Any]:
    """Prefect wrapper of :func:`choose_champion`."""
    outcome = choose_champion(archive_path, volume_ids, name, version, tracking_uri, inference)
    get_run_logger().info("%s v%s: evaluation-set fluid Dice %.4f; champion v%s", name, version, outcome["score"],
                          outcome["champion"])
    return outcome
