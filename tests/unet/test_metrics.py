"""Tests for unet.metrics: pooled Dice/IoU, the empty-class rule, pixel error, adapted Rand error."""
from __future__ import annotations

import numpy as np
import pytest

from octseg.unet.metrics import adapted_rand_error, confusion_matrix, dice_per_class, iou_per_class, pixel_error

PRED = np.array([[0, 1], [1, 1]])
TARGET = np.array([[0, 1], [0, 1]])
# class 0: TP 1, FP 0, FN 1 -> Dice 2/3, IoU 1/2;  class 1: TP 2, FP 1, FN 0 -> Dice 4/5, IoU 2/3


def test_confusion_matrix_rows_predicted_columns_true() -> None:
    np.testing.assert_array_equal(confusion_matrix(PRED, TARGET, 2), [[1, 0], [1, 2]])


@pytest.mark.parametrize(
    "fn, expected",
    [
        (dice_per_class, [2 / 3, 4 / 5]),
        (iou_per_class, [1 / 2, 2 / 3]),
    ],
)
def test_hand_example(fn, expected: list) -> None:
    np.testing.assert_allclose(fn(PRED, TARGET, 2), expected)


@pytest.mark.parametrize(
    "pred, target, empty, expected",
    [
        # class 2 absent from both -> empty (NaN by default)
        (PRED, TARGET, float("nan"), [2 / 3, 4 / 5, np.nan]),
        (PRED, TARGET, 1.0, [2 / 3, 4 / 5, 1.0]),  # callers may count it as perfect
        # class 2 predicted but absent from the target -> 0, not empty
        (np.array([[0, 2], [1, 1]]), TARGET, 1.0, [2 / 3, 1 / 2, 0.0]),  # class 1: TP 1, FP 1, FN 1
    ],
)
def test_empty_class_rule(pred: np.ndarray, target: np.ndarray, empty: float, expected: list) -> None:
    np.testing.assert_allclose(dice_per_class(pred, target, 3, empty=empty), expected)
    iou = iou_per_class(pred, target, 3, empty=empty)
    assert np.isnan(iou[2]) == np.isnan(expected[2])


def test_pooled_over_the_set_differs_from_mean_of_images() -> None:
    target = np.zeros((2, 4, 4), dtype=np.int64)
    target[0, 0, 0] = 1  # image 0: one foreground pixel ...
    target[1, :2, :] = 1  # image 1: 8 foreground pixels
    pred = target.copy()
    pred[0, 0, 0] = 0  # ... which the prediction misses
    per_image = [dice_per_class(pred[i], target[i], 2)[1] for i in range(2)]
    assert per_image == [0.0, 1.0]  # mean 0.5
    pooled = dice_per_class(pred, target, 2)[1]
    assert pooled == pytest.approx(2 * 8 / (2 * 8 + 0 + 1))  # 16/17, far from 0.5


def test_pixel_error() -> None:
    assert pixel_error(PRED, TARGET) == 0.25
    assert pixel_error(TARGET, TARGET) == 0.0
    assert pixel_error(np.ones((3, 5), bool), np.zeros((3, 5), bool)) == 1.0


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: dice_per_class(PRED, TARGET[:1], 2), ValueError, r"same shape, got \(2, 2\) and \(1, 2\)"),
        (lambda: iou_per_class(PRED.astype(float), TARGET, 2), TypeError, "integer labels, got dtype float64"),
        (lambda: dice_per_class(PRED + 1, TARGET, 2),
         ValueError, r"pred labels must lie in \[0, 2\), got \[1, 2\]"),
        (lambda: dice_per_class(PRED, TARGET, 0), ValueError, "num_classes must be an int >= 1"),
        (lambda: pixel_error(PRED, TARGET.T[:1]), ValueError, "same shape"),
        (lambda: pixel_error(np.zeros(0, int), np.zeros(0, int)), ValueError, "at least one pixel"),
    ],
)
def test_bad_inputs_are_refused(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_adapted_rand_error() -> None:
    target = np.ones((4, 4), dtype=np.int64)  # one object
    assert adapted_rand_error(target, target) == 0.0
    assert adapted_rand_error(target * 7, target) == 0.0  # label ids do not matter, only the partition
    split = target.copy()
    split[:, 2:] = 2  # the object split in two halves
    error = adapted_rand_error(split, target)
    assert 0.0 < error < 1.0
    assert isinstance(error, float)


def test_adapted_rand_error_ignores_target_background() -> None:
    target = np.array([[0, 0], [1, 1]])
    pred = np.array([[5, 3], [1, 1]])  # differs only where the target is 0 (background)
    assert adapted_rand_error(pred, target) == 0.0


def test_scores_from_confusion_match_the_direct_functions_and_a_hand_count():
    from octseg.unet.metrics import confusion_matrix, scores_from_confusion

    rng = np.random.default_rng(3)
    pred, target = rng.integers(0, 3, (2, 17, 19)), rng.integers(0, 3, (2, 17, 19))
    scores = scores_from_confusion(confusion_matrix(pred, target, 3))
    np.testing.assert_allclose(scores["dice"], dice_per_class(pred, target, 3))
    np.testing.assert_allclose(scores["iou"], iou_per_class(pred, target, 3))
    assert scores["pixel_error"] == pytest.approx(pixel_error(pred, target))
    for k in range(3):  # precision and recall counted by hand
        tp = np.sum((pred == k) & (target == k))
        assert scores["precision"][k] == pytest.approx(tp / np.sum(pred == k))
        assert scores["recall"][k] == pytest.approx(tp / np.sum(target == k))


def test_scores_from_confusion_empty_class_rule():
    """A class absent from prediction and target: NaN (or the given value) for every ratio."""
    from octseg.unet.metrics import scores_from_confusion

    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    scores = scores_from_confusion(cm)
    assert all(np.isnan(scores[m][2]) for m in ("dice", "iou", "precision", "recall"))
    assert scores_from_confusion(cm, empty=1.0)["dice"][2] == 1.0
    assert scores["pixel_error"] == pytest.approx(3 / 11)
