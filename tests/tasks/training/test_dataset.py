"""Annotated B-scans from the archive, and the train/validation split."""
from __future__ import annotations

import numpy as np
import pytest

from octseg.tasks.archive.store import open_archive
from octseg.tasks.training.dataset import load_annotated, split_train_val
from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.tasks.preprocess.derive import preprocess_volume
from octseg.unet.bscans import BScanSet
from octseg.unet.normalize import normalize_volume


def _set(n: int, value: float) -> BScanSet:
    return BScanSet(np.full((n, 4, 4), value, np.float32), np.zeros((n, 4, 4), np.int64))


@pytest.mark.parametrize(
    "sizes, fraction, n_train, n_val",
    [
        ({"a": 3, "b": 3, "c": 3, "d": 3}, 0.25, 9, 3),  # whole volumes held out: 1 of 4
        ({"a": 2, "b": 5}, 0.2, None, None),  # at least one volume is held out
        ({"only": 10}, 0.2, 8, 2),  # one volume: B-scans are held out
        ({"only": 1}, 0.2, 1, 0),  # nothing to hold out
        ({"a": 3, "b": 3}, 0.0, 6, 0),  # no validation requested
        ({"a": 3, "b": 3}, 0.9, 3, 3),  # a large fraction still leaves a volume to train on
        ({"only": 4}, 0.99, 1, 3),  # ... and a B-scan
    ],
)
def test_split_sizes(sizes, fraction, n_train, n_val):
    sets = {k: _set(n, i) for i, (k, n) in enumerate(sizes.items())}
    train, val = split_train_val(sets, fraction, seed=0)
    got_val = 0 if val is None else len(val)
    assert len(train) + got_val == sum(sizes.values())
    if n_train is not None:
        assert (len(train), got_val) == (n_train, n_val)
    if len(sizes) > 1 and val is not None:  # no volume is split between train and validation
        assert not set(np.unique(train.images)) & set(np.unique(val.images))


def test_mixed_shapes_fail_whatever_the_seed():
    sets = {"a": _set(2, 0), "b": _set(2, 1), "c": BScanSet(np.zeros((2, 5, 4), np.float32), np.zeros((2, 5, 4), np.int64))}
    for seed in range(6):
        with pytest.raises(ValueError, match="differ in shape"):
            split_train_val(sets, 0.34, seed=seed)


def test_volumes_without_weight_maps_get_uniform_weights_only_themselves():
    weighted = BScanSet(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.int64), np.full((2, 4, 4), 3.0, np.float32))
    train, _ = split_train_val({"w": weighted, "plain": _set(2, 1)}, 0.0, seed=0)
    assert train.weights is not None
    assert sorted(np.unique(train.weights).tolist()) == [1.0, 3.0]  # the weighted volume keeps its maps


def test_split_without_annotations_is_a_clear_error():
    with pytest.raises(ValueError, match="no annotated B-scans"):
        split_train_val({}, 0.2, seed=0)


def test_load_annotated_uses_preprocessed_arrays(tmp_path):
    ph = make_phantom_volume(n_bscans=4, height=40, width=48, seed=2)
    arc = open_archive(tmp_path / "a.zarr")
    labels = ph.fluid.copy()
    labels[0] = 0
    arc.write_volume("v", ph.image, provenance={"source": "p", "source_sha256": "s", "reader": "t"},
                     manual_labels=labels, annotated=[1, 3])
    raw = load_annotated(arc.path, "v")  # before preprocessing: normalised on the fly, no weights
    assert raw.weights is None and len(raw) == 2
    np.testing.assert_allclose(raw.images, normalize_volume(ph.image[[1, 3]]), atol=1e-6)
    preprocess_volume(arc.path, "v")
    done = load_annotated(arc.path, "v")
    assert done.weights is not None and done.weights.shape == (2, 40, 48)
    np.testing.assert_array_equal(done.labels, labels[[1, 3]])


def test_unannotated_volume_yields_nothing(tmp_path):
    arc = open_archive(tmp_path / "a.zarr")
    arc.write_volume("v", np.zeros((2, 40, 40), np.uint8), provenance={"source": "p", "source_sha256": "s", "reader": "t"})
    assert load_annotated(arc.path, "v") is None
