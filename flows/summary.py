"""What each flow returns: small, printable summaries (counts, where outputs are, failures)."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EvaluateSummary", "IngestSummary", "PipelineSummary", "PreprocessSummary", "SegmentSummary",
           "TrainSummary", "WatchSummary"]


@dataclass
class IngestSummary:
    archive: str
    written: list[str] = field(default_factory=list)  # volume ids
    skipped: list[str] = field(default_factory=list)  # already in the archive, unchanged
    failures: list[str] = field(default_factory=list)  # "file: what was wrong"
    warnings: list[str] = field(default_factory=list)  # "volume id: what was repaired or dropped"

    @classmethod
    def from_results(cls, archive: str, results, failures: list[str]) -> IngestSummary:
        s = cls(archive, failures=list(failures))
        for r in results:
            (s.written if r.status == "written" else s.skipped).append(r.volume_id)
            s.warnings.extend(f"{r.volume_id}: {w}" for w in getattr(r, "warnings", []))
        return s

    def headline(self) -> str:
        return (
            f"ingest: {len(self.written)} written, {len(self.skipped)} up to date, "
            f"{len(self.failures)} failed -> {self.archive}"
        )


@dataclass
class PreprocessSummary:
    archive: str
    computed: dict[str, list[str]] = field(default_factory=dict)  # volume id -> derived arrays written
    up_to_date: list[str] = field(default_factory=list)  # volumes with nothing to do
    failures: list[str] = field(default_factory=list)  # "volume: what went wrong"

    def headline(self) -> str:
        return (
            f"preprocess: {len(self.computed)} volumes computed, {len(self.up_to_date)} up to date, "
            f"{len(self.failures)} failed in {self.archive}"
        )


@dataclass
class TrainSummary:
    run_id: str
    model_name: str
    model_version: str
    score: float  # validation Dice of the foreground class
    promoted: bool
    tracking_uri: str
    n_train: int = 0
    n_val: int = 0
    qc_image: str | None = None
    reused: bool = False  # an identical run was already registered; nothing was trained
    eval_score: float | None = None  # pooled fluid Dice on the evaluation set, when there is one
    eval_set: str | None = None  # its fingerprint
    champion_version: str | None = None  # the champion after this run
    folds: int = 0  # a cross-validation ensemble: ``score`` is its pooled out-of-fold Dice
    oof: dict | None = None  # its out-of-fold scores per volume, with the bootstrap interval

    @classmethod
    def from_result(cls, r, tracking_uri: str) -> TrainSummary:
        """From a :class:`octseg.tasks.training.train.TrainResult`."""
        return cls(run_id=r.run_id, model_name=r.model_name, model_version=r.model_version, score=r.score,
                   promoted=r.promoted, tracking_uri=tracking_uri, n_train=r.n_train, n_val=r.n_val,
                   qc_image=r.qc_image, reused=r.reused, folds=getattr(r, "folds", 0), oof=getattr(r, "oof", None))

    def headline(self) -> str:
        champion = "now champion" if self.promoted else "champion unchanged"
        if not self.promoted and self.champion_version:
            champion = f"champion stays v{self.champion_version}"
        source = f"out-of-fold ({self.folds} folds)" if self.folds else "val" if self.n_val else "train"
        what = "already trained as" if self.reused else "trained"
        scored = "" if self.eval_score is None else (
            f", evaluation-set fluid Dice {self.eval_score:.3f} (set {(self.eval_set or '')[:8]})")
        return (
            f"train: {what} {self.model_name} v{self.model_version} (run {self.run_id[:8]}), "
            f"{source} fluid Dice {self.score:.3f}{self._interval()}{scored}, {champion}; tracking at "
            f"{self.tracking_uri}"
        )

    def _interval(self) -> str:
        if not self.oof:
            return ""
        lo, hi = self.oof["interval"]
        per = ", ".join(f"{v} {d:.3f}" for v, d in self.oof["per_subject"].items())
        return (f" (95% CI over subjects {lo:.3f}-{hi:.3f}; {per}; fluid predicted in {self.oof['false_alarms']} "
                f"of {self.oof['empty_bscans']} fluid-free B-scans)")


@dataclass
class SegmentSummary:
    archive: str
    model: str  # name/version
    segmented: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already segmented by this model version
    failures: list[str] = field(default_factory=list)
    qc_dir: str | None = None
    report: str | None = None  # the per-volume CSV (segmentation.csv), when anything was segmented
    busy: list[str] = field(default_factory=list)  # being segmented by another run right now

    def headline(self) -> str:
        report = f"; per-volume report {self.report}" if self.report else ""
        busy = f", {len(self.busy)} held by another run" if self.busy else ""
        return (
            f"segment: {len(self.segmented)} segmented, {len(self.skipped)} already done{busy}, "
            f"{len(self.failures)} failed with {self.model}; QC overlays in {self.qc_dir}{report}"
        )


@dataclass
class EvaluateSummary:
    archive: str
    model: str  # "name vN"
    evaluation_set: str  # fingerprint
    volumes: list[str] = field(default_factory=list)  # scored
    dice: dict[str, float] = field(default_factory=dict)  # class name -> pooled Dice
    report: str | None = None  # the report's folder
    failures: list[str] = field(default_factory=list)
    per_volume: dict[str, float] = field(default_factory=dict)  # volume -> Dice of class 1
    interval: tuple[float, float] | None = None  # bootstrap 95% interval of the pooled class-1 Dice over volumes
    false_alarms: tuple[int, int] | None = None  # (B-scans without class 1 where it was predicted, such B-scans)
    trained_on: list[str] = field(default_factory=list)  # scored volumes that trained the model

    def headline(self) -> str:
        dice = ", ".join(f"{name} {d:.3f}" for name, d in self.dice.items())
        extra = ""
        if self.interval is not None and not any(x != x for x in self.interval):
            extra += f" (class-1 95% CI over volumes {self.interval[0]:.3f}-{self.interval[1]:.3f})"
        if self.per_volume:
            extra += "; per volume " + ", ".join(f"{v} {d:.3f}" for v, d in self.per_volume.items())
        if self.false_alarms is not None:
            extra += f"; predicted in {self.false_alarms[0]} of {self.false_alarms[1]} B-scans without it"
        if self.trained_on:
            extra += (f"; NOT HELD OUT: {', '.join(self.trained_on)} trained this model (a training score, not "
                      f"recorded on the version)")
        return (f"evaluate: {self.model} on {len(self.volumes)} volumes (set {self.evaluation_set[:8]}): "
                f"pooled Dice {dice or '-'}{extra}, {len(self.failures)} failed; report in {self.report}")


@dataclass
class PipelineSummary:
    ingest: IngestSummary
    preprocess: PreprocessSummary
    train: TrainSummary
    segment: SegmentSummary

    @property
    def failures(self) -> list[str]:
        return self.ingest.failures + self.preprocess.failures + self.segment.failures

    def headline(self) -> str:
        return "\n".join(s.headline() for s in (self.ingest, self.preprocess, self.train, self.segment))


@dataclass
class WatchSummary:
    inbox: str
    archive: str
    ingested: list[str] = field(default_factory=list)  # volume ids of the new files
    segmented: list[str] = field(default_factory=list)
    known: int = 0  # files whose content the archive already holds
    unsettled: int = 0  # files still changing: left for the next run
    failures: list[str] = field(default_factory=list)
    known_bad: int = 0  # files refused before and unchanged since: not read again

    def headline(self) -> str:
        waiting = f"; {self.unsettled} still being written" if self.unsettled else ""
        bad = f", {self.known_bad} known bad (unchanged)" if self.known_bad else ""
        if not self.ingested and not self.failures:
            return f"watch: nothing new in {self.inbox} ({self.known} already in {self.archive}{bad}{waiting})"
        return (f"watch: {len(self.ingested)} new volumes ingested, {len(self.segmented)} segmented, "
                f"{len(self.failures)} failed{bad} -> {self.archive}{waiting}")
