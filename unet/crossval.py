"""Cross-validation by subject, and out-of-fold scores that cannot fool themselves.

Volumes are subjects: :func:`subject_folds` splits whole volumes into K folds, never the B-scans of one
volume across folds. :func:`oof_scores` scores out-of-fold predictions per subject and pooled (one
confusion count over every subject's pixels), with a bootstrap 95% interval over subjects (subjects
resampled with replacement, the pooled Dice of each resample), and counts the B-scans without any
foreground in the truth where something was predicted (false alarms a grader sees at once).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["OOFScores", "bootstrap_interval", "oof_scores", "subject_folds"]


def subject_folds(subjects: Sequence[str], k: int) -> list[list[str]]:
    """``k`` folds of whole subjects: the sorted subjects cut into ``k`` consecutive runs whose sizes differ by
    at most one (deterministic: 6 subjects in 3 folds are 1-2, 3-4, 5-6). ValueError unless 2 <= k <= subjects."""
    names = sorted(dict.fromkeys(subjects))
    if not 2 <= k <= len(names):
        raise ValueError(f"cross-validation needs 2 <= folds <= subjects ({len(names)}), got folds={k}")
    return [names[i * len(names) // k:(i + 1) * len(names) // k] for i in range(k)]


def _counts(pred: np.ndarray, truth: np.ndarray, foreground: int) -> tuple[int, int, int, int, int]:
    """tp, fp, fn, fluid-free B-scans, fluid-free B-scans with predicted foreground."""
    p, t = pred == foreground, truth == foreground
    empty = ~t.reshape(len(t), -1).any(axis=1)
    alarms = p.reshape(len(p), -1).any(axis=1) & empty
    return int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()), int(empty.sum()), int(alarms.sum())


def _dice(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")


def bootstrap_interval(counts: np.ndarray, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the pooled Dice when subjects (rows of ``counts``: tp, fp, fn) are resampled with
    replacement ``n`` times (percentile bootstrap)."""
    counts = np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(counts), size=(n, len(counts)))
    tp, fp, fn = (counts[pick, j].sum(axis=1) for j in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
    lo, hi = np.nanpercentile(dice, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class OOFScores:
    """Out-of-fold Dice of one class: per subject and pooled, with its bootstrap interval over subjects."""

    per_subject: dict[str, float]
    pooled: float
    interval: tuple[float, float]
    empty_bscans: int  # B-scans whose truth has none of the class
    false_alarms: int  # of those, B-scans where the class was predicted
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # tp, fp, fn per subject

    def line(self) -> str:
        per = ", ".join(f"{s} {d:.3f}" for s, d in self.per_subject.items())
        return (f"pooled Dice {self.pooled:.3f} (95% CI over subjects {self.interval[0]:.3f}-{self.interval[1]:.3f}); "
                f"{per}; predicted in {self.false_alarms} of {self.empty_bscans} B-scans without it")

    def to_dict(self) -> dict:
        return {"per_subject": self.per_subject, "pooled": self.pooled, "interval": list(self.interval),
                "empty_bscans": self.empty_bscans, "false_alarms": self.false_alarms,
                "counts": {s: list(c) for s, c in self.counts.items()}}


def oof_scores(predictions: Mapping[str, np.ndarray], truths: Mapping[str, np.ndarray], foreground: int = 1,
               seed: int = 0) -> OOFScores:
    """Scores of labels ``predictions[subject]`` (Z, H, W) against ``truths[subject]`` (same shape)."""
    rows = {s: _counts(np.asarray(predictions[s]), np.asarray(truths[s]), foreground) for s in sorted(predictions)}
    counts = np.array([r[:3] for r in rows.values()], dtype=np.float64)
    return OOFScores(
        per_subject={s: _dice(*r[:3]) for s, r in rows.items()},
        pooled=_dice(*counts.sum(axis=0)),
        interval=bootstrap_interval(counts, seed=seed),
        empty_bscans=sum(r[3] for r in rows.values()),
        false_alarms=sum(r[4] for r in rows.values()),
        counts={s: r[:3] for s, r in rows.items()},
    )
