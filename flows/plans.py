"""What a command would do, found without Prefect or torch: the command asks first, and when there is
nothing to do it says so in a few seconds instead of starting a flow run.

Each plan applies the same rule as its flow's tasks (the flow checks again as it works, so a plan
never decides what is written): ingest skips sources the archive holds unchanged, preprocess skips
volumes whose derived arrays carry current fingerprints, train reuses a registered run with the
same data and settings, segment skips volumes the pinned model version already segmented.

The plans of ingest, preprocess and segment read the archive's catalogue
(:mod:`octseg.tasks.archive.catalogue`), not every volume: each "nothing to do" rests on a catalogue row
whose files (the volume's ``zarr.json``, its prediction's or derived arrays') still have the stamps the
row was read from; any other row is read again from its volume first, so the volume's own records win.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import stat
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from octseg.flows.config import IngestConfig, PreprocessConfig, SegmentConfig, TrainFlowConfig
from octseg.flows.summary import IngestSummary, PreprocessSummary, TrainSummary
from octseg.tasks.archive.catalogue import catalogue_for
from octseg.tasks.archive.names import volume_id_from_path
from octseg.tasks.readers.sources import shown, source_check
from octseg.tasks.runtime.memory import paused_gc
from octseg.tasks.tracking.models import ModelRef

__all__ = ["ModelVersion", "duplicate_ids", "plan_ingest", "training_volumes", "plan_preprocess", "plan_segmentation",
           "previous_training", "registered_version"]


def duplicate_ids(sources: Sequence[str | Path], ids: dict | None = None, stats: dict | None = None) -> dict:
    """Sources that cannot go into this batch -> error text: whose volume id an earlier source of the
    batch already takes, and those :func:`~octseg.tasks.readers.sources.source_problem` refuses by name (not
    UTF-8, a symlink loop, missing). Each fails alone; the rest of the batch goes on. ``ids``, when given,
    receives the volume id of each source that can go; ``stats`` the ``lstat`` of each that is not a link."""
    seen: dict[str, Path] = {}
    dup: dict[Path, str] = {}
    for src in sources:
        problem, st, link = source_check(src)
        if problem:
            dup[src] = problem
            continue
        vid = volume_id_from_path(src, is_dir=stat.S_ISDIR(st.st_mode))
        if vid in seen:
            dup[src] = (f"{shown(src)}: volume id {vid!r} is already used by {shown(seen[vid])} in this batch; "
                        f"rename one of them")
        else:
            seen[vid] = src
            if ids is not None:
                ids[src] = vid
            if stats is not None and not link:
                stats[src] = st
    return dup


@paused_gc()
def plan_ingest(config: IngestConfig) -> tuple[list[str], IngestSummary]:
    """(sources to ingest, a summary of the rest): those the archive holds unchanged are skipped, a
    source whose volume id an earlier one in the batch already uses is a failure, as in the flow. A source
    whose path and stamp the catalogue remembers is not read (its SHA-256 is known)."""
    from octseg.tasks.ingest.known import forget_folders, known_sha256
    from octseg.tasks.ingest.rules import labels_sha256, same_content, settings_match, stale_reading
    from octseg.tasks.readers.registry import source_sha256

    forget_folders()
    given = config.source_names()
    ids: dict[str, str] = {}
    stats: dict[str, os.stat_result] = {}
    duplicates = duplicate_ids(given, ids, stats)
    summary = IngestSummary(str(config.archive), failures=list(duplicates.values()))
    sources = [s for s in given if s not in duplicates]
    if not (Path(config.archive) / "zarr.json").is_file():
        return [str(s) for s in sources], summary
    catalogue = catalogue_for(config.archive)
    entries = catalogue.entries(sorted(set(ids.values())), verify=("volume",), missing_ok=True)
    remembered = catalogue.sources()
    options = config.reader_options.model_dump()
    settings: dict[tuple[str, str | None], bool] = {}  # each distinct (settings, reader) judged once
    todo = []
    for src in sources:
        entry = entries.get(ids[src])
        if entry is None and (copy := _known_copy(catalogue, src, ids[src], remembered, stats, config, options)):
            summary.skipped.append(copy)  # a copy of a held scan, known from the catalogue
            summary.warnings.append(f"{copy}: {shown(src)} is the same scan (same bytes, same masks): not stored "
                                    f"again as {ids[src]!r}")
            continue
        try:  # ingest's rule (octseg.tasks.ingest.rules.unchanged) on the catalogue's columns, not the provenance
            labels_fp = labels_sha256(config.labels, src)
            done = entry is not None and entry.settings is not None and same_content(
                entry.source_sha256, entry.labels_sha256,
                known_sha256(catalogue, src, remembered, stats.get(src)) or source_sha256(src), labels_fp)
            if done:
                key = (entry.settings, entry.reader, labels_fp is not None)
                if key not in settings:
                    meta = {**json.loads(entry.settings), "reader": entry.reader}
                    settings[key] = settings_match(meta, options) and not stale_reading(meta, labels_fp)
                done = settings[key]
        except Exception:  # an unreadable file: the flow reports it
            done = False
        if done:
            summary.skipped.append(ids[src])
        else:
            todo.append(str(src))
    return todo, summary


def _known_copy(catalogue, src: Path, volume_id: str, remembered, stats, config: IngestConfig,
                options: dict) -> str | None:
    """The volume holding ``src``'s scan under another id, when the catalogue remembers ``src`` (path and
    stamp) so its SHA-256 is known without reading it; else None (ingest decides, reading it)."""
    from octseg.tasks.ingest.known import known_sha256
    from octseg.tasks.ingest.rules import held_copy, labels_sha256

    try:
        sha = known_sha256(catalogue, src, remembered, stats.get(src))
        return held_copy(catalogue, volume_id, sha, labels_sha256(config.labels, src), options) if sha else None
    except Exception:  # an unreadable file or labels folder: the flow reports it
        return None


@paused_gc()
def plan_preprocess(config: PreprocessConfig) -> tuple[list[str], PreprocessSummary]:
    """(volumes with a derived array to (re)compute, a summary listing those up to date)."""
    from octseg.tasks.preprocess.fingerprints import expected_fingerprints

    summary = PreprocessSummary(str(config.archive))
    todo = []
    for vid, entry in catalogue_for(config.archive).entries(config.volumes, verify=("volume", "derived")).items():
        if entry.status == "unreadable":
            todo.append(vid)  # a broken volume: the flow reports it
            continue
        labels_fp = entry.labels_sha256 or entry.labels_digest
        if entry.manual and not labels_fp:  # written before octseg recorded its labels' digest: read them
            current = _current_from_volume(config, vid)
        else:
            fps = expected_fingerprints(entry.source_sha256, labels_fp if entry.manual else None,
                                        config.weights, manual=entry.manual)
            current = all(entry.derived_current(name, fp) for name, fp in fps.items())
        (summary.up_to_date if current else todo).append(vid)
    return todo, summary


def _current_from_volume(config: PreprocessConfig, volume_id: str) -> bool:
    from octseg.tasks.archive.store import open_archive
    from octseg.tasks.preprocess.derive import outdated

    try:
        return not outdated(open_archive(config.archive, create=False), volume_id, config.weights)
    except Exception:  # a broken volume: the flow reports it
        return False


def training_volumes(config: TrainFlowConfig) -> tuple[list[str], list[str]]:
    """(volumes to train on, the evaluation set held out of them: the config's, else the archive's)."""
    from octseg.tasks.archive.store import open_archive, select_volumes

    evaluation = list(config.evaluation_volumes or open_archive(config.archive, create=False).evaluation_set() or [])
    if evaluation:
        archive = open_archive(config.archive, create=False)
        select_volumes(config.archive, evaluation)  # each must exist ...
        unannotated = [v for v in evaluation if not (archive.manual_labels(v) or (None, []))[1]]
        if unannotated:  # ... and be annotated
            raise ValueError(f"evaluation volumes need manual labels: {unannotated}")
    volumes = [v for v in select_volumes(config.archive, config.volumes) if v not in evaluation]
    if config.volumes is not None:  # named: each must have something to train on (by default, all that do)
        archive = open_archive(config.archive, create=False)
        unannotated = [v for v in volumes if not (archive.manual_labels(v) or (None, []))[1]]
        if unannotated:
            raise ValueError(f"volumes named to train on have no annotated B-scans: {unannotated}; ingest them with "
                             f"--labels, or leave them out")
    entries = catalogue_for(config.archive).entries(volumes + evaluation)
    volumes = _one_per_scan(config, volumes, evaluation, entries)
    if not volumes:
        raise ValueError(f"every selected volume is in the evaluation set {evaluation}; nothing left to train on")
    if evaluation:  # the flow's own "no annotated B-scans" would not say where the annotated ones went
        annotated = [v for v in volumes if entries[v].annotated]
        held = f"the evaluation set {sorted(evaluation)} is held out of training"
        if not annotated:
            raise ValueError(f"{held}, and no other volume has annotated B-scans; ingest more with --labels, or "
                             f"change the evaluation set (evaluation_volumes in the config, or `octseg evaluate --fix`)")
        if config.folds and config.folds > len(annotated):
            raise ValueError(f"--folds {config.folds} needs as many annotated volumes, but {held}; "
                             f"{len(annotated)} remain to train on: {annotated}")
    return volumes, evaluation


def _one_per_scan(config: TrainFlowConfig, volumes: list[str], evaluation: list[str], entries: dict) -> list[str]:
    """``volumes`` without those holding the scan of an evaluation volume (ValueError: that would be a training
    score on the evaluation set) and, by default, with one volume per scan (the first id; the others are logged),
    since two volumes of one scan (copies, or two graders' masks) could validate or score out of fold on a scan
    they trained on; when the volumes were named, two of one scan are an error (``source_digests``).
    ``entries``: the catalogue's entries of the volumes and the evaluation set."""
    held_out = {entries[v].source_sha256 for v in evaluation if entries[v].source_sha256}
    clash = [v for v in volumes if entries[v].source_sha256 in held_out]
    if clash:
        raise ValueError(f"{config.archive}: volumes {clash} hold the same scans as evaluation volumes "
                         f"{sorted(evaluation)}: training on them would score the model on scans it trained on; "
                         f"leave them out (--volume) or remove them")
    if config.volumes is not None:
        return volumes
    first: dict[str, str] = {}
    kept, dropped = [], []
    for v in volumes:
        sha = entries[v].source_sha256
        if sha and sha in first:
            dropped.append(f"{v} (the scan of {first[sha]})")
            continue
        if sha:
            first[sha] = v
        kept.append(v)
    if dropped:
        _warn(f"training on one volume per scan: left out {', '.join(dropped)}")
    return kept


def _warn(message: str) -> None:
    """To the flow run's log when there is one, else to this module's."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # no run context (a plan before the flow)
        logging.getLogger(__name__).warning(message)


def previous_training(config: TrainFlowConfig, tracking_uri: str) -> TrainSummary | None:
    """The summary of a registered run that trained on this data with these settings, or None.

    Raises ValueError, before any run, when the selection holds no annotated B-scans.
    """
    from octseg.tasks.archive.classes import class_names_of
    from octseg.tasks.training.crossval import crossval_fingerprint
    from octseg.tasks.training.dataset import load_training_data, load_volume_sets
    from octseg.tasks.training.train import find_previous_training, training_fingerprint
    from octseg.unet.crossval import subject_folds
    from octseg.tasks.tracking.uri import ensure_experiment

    volumes, evaluation = training_volumes(config)
    if evaluation:  # the flow reuses the training and chooses the champion (cached scores): it must run
        return None
    if config.folds:  # too many folds for the subjects is a one-line error here, before any run
        sets = load_volume_sets(config.archive, volumes)
        split = subject_folds(list(sets), config.folds)
        fingerprint = crossval_fingerprint(sets, split, config.unet, config.train, config.model_name,
                                           config.fold_models)
    else:
        train, val = load_training_data(config.archive, volumes, config.val_fraction, seed=config.train.seed,
                                        val_volumes=config.val_volumes)
        has_val = val is not None and len(val) > 0
        fingerprint = training_fingerprint(train, val if has_val else None, config.unet, config.train,
                                           config.model_name)
    experiment_id = ensure_experiment(tracking_uri, config.experiment)
    found = find_previous_training(fingerprint, tracking_uri, experiment_id, config.model_name,
                                   class_names_of(config.unet.out_channels))
    return None if found is None else TrainSummary.from_result(found, tracking_uri)


@paused_gc()
def plan_segmentation(config: SegmentConfig, ref: ModelRef | ModelVersion,
                      bscans: dict[str, int] | None = None) -> tuple[list[str], list[str]]:
    """(volumes to segment, volumes this model version already segmented) of the selection; ``bscans``, when
    given, receives the B-scans of each volume to segment."""
    todo, done = [], []
    entries = catalogue_for(config.archive).entries(config.volumes, verify=("volume", "prediction"))
    for vid, entry in entries.items():
        finished = not config.force and entry.segmented_by(ref.name, ref.version)
        (done if finished else todo).append(vid)
        if bscans is not None and not finished:
            bscans[vid] = entry.n_bscans
    return todo, done


@dataclass(frozen=True)
class ModelVersion:
    """A registered model's name and version: all :func:`plan_segmentation` needs of a model."""

    name: str
    version: str


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def registered_version(model_uri: str, tracking_uri: str) -> ModelVersion | None:
    """The name and version ``model_uri`` names, read without loading MLflow (its SQLite file, read-only, or
    its server's REST API, 5 s at most), so that a command with nothing to do answers in a second; None when
    that cannot tell (the command then resolves the model through MLflow, with all its checks)."""
    match = _MODEL_URI.match(model_uri)
    if match is None:
        return None
    name, alias, version = match["name"], match["alias"], match["version"]
    if version is not None:
        return ModelVersion(name, version)
    found: list[str] = []
    with contextlib.suppress(Exception):  # any doubt: MLflow itself decides
        if tracking_uri.startswith("sqlite:///"):
            path = tracking_uri.removeprefix("sqlite:///")
            path = path if path.startswith("/") else os.path.join(os.getcwd(), path)
            if not os.path.isfile(path):
                return None
            with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True,
                                                    timeout=5)) as conn:
                try:
                    rows = conn.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ? "
                                        "AND workspace = 'default'", (name, alias)).fetchall()
                except sqlite3.OperationalError:  # a schema without workspaces
                    rows = conn.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                                        (name, alias)).fetchall()
            found = [str(r[0]) for r in rows]
        elif tracking_uri.startswith(("http://", "https://")) and not any(
                os.environ.get(k) for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME")):
            query = urllib.parse.urlencode({"name": name, "alias": alias})
            url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/registered-models/alias?{query}"
            with urllib.request.urlopen(url, timeout=5) as response:
                found = [str(json.loads(response.read())["model_version"]["version"])]
    return ModelVersion(name, found[0]) if len(found) == 1 else None
