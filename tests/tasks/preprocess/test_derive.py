"""Preprocessing of one volume: the Dask result equals the plain NumPy functions, on threads and on
a real Dask cluster reached by its tcp:// address; reruns skip what is up to date."""
from __future__ import annotations

import numpy as np
import pytest

from octseg.tasks.archive.store import open_archive
from octseg.tasks.synthetic.phantom import make_phantom_volume
from octseg.tasks.preprocess.derive import derived_fingerprints, outdated, preprocess_volume
from octseg.unet.config import WeightMapConfig
from octseg.unet.normalize import normalize_volume
from octseg.unet.weights import border_weight_map

ANNOTATED = [1, 2, 4, 8]  # spans two shards of 8 B-scans


@pytest.fixture
def archive(tmp_path):
    ph = make_phantom_volume(n_bscans=10, height=48, width=64, seed=3)
    labels = np.zeros_like(ph.fluid)
    labels[ANNOTATED] = ph.fluid[ANNOTATED]
    arc = open_archive(tmp_path / "a.zarr")
    arc.write_volume("vol", ph.image, provenance={"source": "phantom", "source_sha256": "abc", "reader": "test"},
                     manual_labels=labels, annotated=ANNOTATED)
    return arc, ph.image, labels


def _check_outputs(arc, image, labels):
    np.testing.assert_allclose(np.asarray(arc.open_derived("vol", "normalized")[...]), normalize_volume(image), atol=1e-6)
    weights = np.asarray(arc.open_derived("vol", "weights")[...])
    for z in range(len(image)):
        if z in ANNOTATED:
            np.testing.assert_allclose(weights[z], border_weight_map(labels[z]), atol=1e-6)
        else:
            assert not weights[z].any(), f"unannotated B-scan {z} must have weight 0"


def test_threaded_dask_equals_numpy(archive):
    arc, image, labels = archive
    result = preprocess_volume(arc.path, "vol")
    assert result.computed == ["normalized", "weights"]
    _check_outputs(arc, image, labels)


def test_external_cluster_by_address_equals_numpy(archive):
    """Blocks spread over the workers, or the whole volume as one task on a worker: both equal NumPy."""
    import shutil

    from distributed import LocalCluster

    from octseg.tasks.runtime.cluster import close_clients

    arc, image, labels = archive
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        for spread in ("blocks", "volume"):
            shutil.rmtree(arc.path / "vol" / "derived", ignore_errors=True)
            result = preprocess_volume(arc.path, "vol", scheduler_address=cluster.scheduler_address, spread=spread)
            assert result.computed == ["normalized", "weights"], spread
            _check_outputs(arc, image, labels)
        close_clients(cluster.scheduler_address)


def test_rerun_skips_and_changed_parameters_recompute_only_what_depends_on_them(archive):
    arc, _, labels = archive
    preprocess_volume(arc.path, "vol")
    again = preprocess_volume(arc.path, "vol")
    assert again.computed == [] and again.skipped == ["normalized", "weights"]
    changed = preprocess_volume(arc.path, "vol", weights=WeightMapConfig(sigma=3.0))
    assert changed.computed == ["weights"] and changed.skipped == ["normalized"]
    w = np.asarray(arc.open_derived("vol", "weights")[ANNOTATED[0]])
    np.testing.assert_allclose(w, border_weight_map(labels[ANNOTATED[0]], sigma=3.0), atol=1e-6)


def test_unannotated_volume_gets_no_weights(tmp_path):
    arc = open_archive(tmp_path / "b.zarr")
    arc.write_volume("plain", make_phantom_volume(3, 40, 40, seed=1).image,
                     provenance={"source": "p", "source_sha256": "x", "reader": "test"})
    result = preprocess_volume(arc.path, "plain")
    assert result.computed == ["normalized"]
    assert arc.open_derived("plain", "weights") is None
    assert list(derived_fingerprints(arc, "plain", WeightMapConfig())) == ["normalized"]
    assert outdated(arc, "plain", WeightMapConfig(sigma=3.0)) == []


def test_outdated_names_what_preprocessing_would_recompute(archive):
    arc, _, _ = archive
    assert outdated(arc, "vol", WeightMapConfig()) == ["normalized", "weights"]  # nothing computed yet
    fps = derived_fingerprints(arc, "vol", WeightMapConfig(sigma=3.0))
    assert list(fps) == ["normalized", "weights"] and fps["weights"]["sigma"] == 3.0
    preprocess_volume(arc.path, "vol")
    assert outdated(arc, "vol", WeightMapConfig()) == []
    assert outdated(arc, "vol", WeightMapConfig(sigma=3.0)) == ["weights"]
    assert outdated(arc, "vol", WeightMapConfig(w0=5.0)) == ["weights"]
    preprocess_volume(arc.path, "vol", weights=WeightMapConfig(sigma=3.0))
    assert outdated(arc, "vol", WeightMapConfig(sigma=3.0)) == []
    assert outdated(arc, "vol", WeightMapConfig()) == ["weights"]
