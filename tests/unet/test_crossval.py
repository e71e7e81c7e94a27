"""Subject folds and out-of-fold scores, checked against counting by hand."""
from __future__ import annotations

import numpy as np
import pytest

from octseg.unet.crossval import bootstrap_interval, oof_scores, subject_folds
from octseg.unet.postprocess import choose_postprocess, remove_small_components


@pytest.mark.parametrize("n, k, sizes", [(6, 3, [2, 2, 2]), (7, 3, [2, 2, 3]), (6, 6, [1] * 6), (5, 2, [2, 3])])
def test_folds_hold_whole_subjects_once(n: int, k: int, sizes: list[int]) -> None:
    subjects = [f"Subject_{i:02d}" for i in range(n, 0, -1)]  # given unsorted
    folds = subject_folds(subjects + subjects[:1], k)  # a repeated name is one subject
    assert [len(f) for f in folds] == sizes
    assert sorted(s for f in folds for s in f) == sorted(subjects)


def test_folds_need_two_to_n() -> None:
    for k in (1, 4):
        with pytest.raises(ValueError, match="2 <= folds <= subjects"):
            subject_folds(["a", "b", "c"], k)


def test_oof_scores_count_by_hand() -> None:
    truth = {"a": np.zeros((3, 4, 4), np.uint8), "b": np.zeros((2, 4, 4), np.uint8)}
    truth["a"][0, :2, :2] = 1  # 4 fluid pixels; B-scans 1 and 2 of a and both of b are fluid-free
    truth["b"][0, 0, :] = 1  # 4 fluid pixels... then b[0] is not fluid-free
    pred = {"a": truth["a"].copy(), "b": np.zeros_like(truth["b"])}
    pred["a"][2, 3, 3] = 1  # one false alarm in a fluid-free B-scan
    s = oof_scores(pred, truth)
    assert s.per_subject == {"a": pytest.approx(8 / 9), "b": 0.0}  # a: tp 4, fp 1; b: fn 4
    assert s.pooled == pytest.approx(2 * 4 / (2 * 4 + 1 + 4))
    assert (s.empty_bscans, s.false_alarms) == (3, 1)
    assert s.interval[0] <= s.pooled <= s.interval[1]


def test_bootstrap_interval_of_identical_subjects_is_a_point() -> None:
    lo, hi = bootstrap_interval(np.array([[5, 1, 1]] * 4), n=200)
    assert lo == pytest.approx(hi) == pytest.approx(10 / 12)


def test_small_components_go_per_bscan_and_class() -> None:
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[0, 0, 0] = 1  # 1 pixel
    labels[0, 4:7, 4:7] = 2  # 9 pixels of class 2
    labels[1, 0:2, 0:3] = 1  # 6 pixels, diagonal neighbour below (8-connected: one component of 7)
    labels[1, 2, 3] = 1
    out = remove_small_components(labels, 7)
    assert out[0].sum() == 18 and out[0, 0, 0] == 0  # the single pixel went, the 9-pixel class-2 blob stayed
    assert (out[1] == labels[1]).all()  # 7 pixels 8-connected: kept
    assert (remove_small_components(labels, 0) == labels).all()


def test_postprocess_is_chosen_only_when_it_helps() -> None:
    truth = {"a": np.zeros((1, 20, 20), np.uint8)}
    truth["a"][0, 5:15, 5:15] = 1
    noisy = {"a": truth["a"].copy()}
    noisy["a"][0, 0, 0] = noisy["a"][0, 19, 19] = 1  # two specks
    choice, scores = choose_postprocess(noisy, truth, candidates=(0, 2, 200))
    assert choice.min_size == 2 and scores[2] == 1.0 > scores[0]
    clean_choice, _ = choose_postprocess(truth, truth, candidates=(0, 2, 200))
    assert clean_choice.min_size == 0  # nothing to gain: none
