"""QC pictures: gray B-scan, transparent background, tinted classes, truth | prediction."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from octseg.tasks.segmentation.qc import class_color, CLASS_COLORS, grayscale, overlay, save_png, side_by_side


def _scan(h: int = 7, w: int = 5) -> np.ndarray:
    """An odd-sized float ramp, so every pixel has a different gray value."""
    return np.linspace(-3.0, 5.0, h * w).reshape(h, w)


def _labels(h: int = 7, w: int = 5) -> np.ndarray:
    labels = np.zeros((h, w), dtype=np.int64)
    labels[2:5, 1:3] = 1
    labels[6, 4] = 2
    labels[0, 0] = -100  # "ignore" label of the training data
    return labels


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_overlay_is_uint8_rgb_of_the_scan_shape(dtype):
    scan = (_scan() - _scan().min()).astype(dtype)
    rgb = overlay(scan, _labels())
    assert rgb.shape == (7, 5, 3) and rgb.dtype == np.uint8


def test_background_keeps_its_gray_value():
    scan, labels = _scan(), _labels()
    gray, rgb = grayscale(scan), overlay(scan, labels)
    background = labels <= 0  # class 0 and negative "ignore" labels are transparent
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel][background], gray[background])


def test_classes_are_tinted_with_their_colour():
    scan, labels = _scan(), _labels()
    gray = grayscale(scan).astype(np.float64)
    rgb = overlay(scan, labels, alpha=0.4)
    for value in (1, 2):
        mask = labels == value
        expected = np.round(0.6 * gray[mask][:, None] + 0.4 * np.array(CLASS_COLORS[value]))
        np.testing.assert_array_equal(rgb[mask], expected.astype(np.uint8))
    fluid = rgb[labels == 1].astype(int)
    assert (fluid[:, 0] > fluid[:, 1]).all()  # red tint: R above G and B
    assert (fluid[:, 0] > fluid[:, 2]).all()


def test_custom_colours_and_alpha():
    scan, labels = _scan(), _labels()
    full = overlay(scan, labels, colors={1: (0, 0, 255)}, alpha=1.0)
    assert (full[labels == 1] == (0, 0, 255)).all()
    assert (full[labels == 2] == CLASS_COLORS[2]).all()  # not overridden: palette colour
    np.testing.assert_array_equal(overlay(scan, labels, alpha=0.0), overlay(scan, np.zeros_like(labels)))


def test_palette_cycles_past_its_last_class():
    assert class_color(1) == CLASS_COLORS[1]
    assert class_color(len(CLASS_COLORS) + 1) == CLASS_COLORS[1]


def test_colours_match_the_archive_label_metadata():
    from octseg.tasks.archive.layout import label_metadata

    names = {0: "background", 1: "fluid", 2: "a", 7: "b"}
    rgba = {c["label-value"]: tuple(c["rgba"][:3]) for c in label_metadata(names)["colors"]}
    assert {v: class_color(v) for v in (1, 2, 7)} == {v: rgba[v] for v in (1, 2, 7)}


def test_grayscale_stretches_and_survives_constant_and_nan():
    ramp = grayscale(_scan(), percentiles=(0, 100))
    assert ramp.min() == 0 and ramp.max() == 255
    assert (grayscale(np.full((3, 4), 7.0)) == 0).all()
    with_nan = _scan()
    with_nan[1, 1] = np.nan
    assert grayscale(with_nan)[1, 1] == 0


def test_side_by_side_puts_truth_left_and_prediction_right():
    scan, truth = _scan(), _labels()
    pred = np.zeros_like(truth)
    pred[0:2, 0:2] = 1
    rgb = side_by_side(scan, truth, pred)
    assert rgb.shape == (7, 2 * 5 + 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, :5], overlay(scan, truth))
    assert (rgb[:, 5:7] == 255).all()  # white separator
    np.testing.assert_array_equal(rgb[:, 7:], overlay(scan, pred))


@pytest.mark.parametrize(
    "labels, error",
    [
        (np.zeros((7, 4), dtype=np.int64), ValueError),  # shape differs from the scan
        (np.zeros((7, 5), dtype=np.float32), TypeError),  # classes must be integers
    ],
)
def test_overlay_rejects_bad_labels(labels, error):
    with pytest.raises(error):
        overlay(_scan(), labels)


def test_save_png_round_trips(tmp_path):
    rgb = side_by_side(_scan(), _labels(), _labels())
    path = save_png(rgb, tmp_path / "sub" / "qc.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)
    with pytest.raises(ValueError, match="uint8"):
        save_png(rgb.astype(np.float32), tmp_path / "bad.png")
