"""The flows on real Duke DME OCT data from ``../shared/data`` (skipped when it is absent).

The Subject_01 volume (61 PNG B-scans, no masks) and the fluid set (66 PNG B-scans with grader-1
fluid masks, as one folder = one volume) are ingested, preprocessed on a Dask LocalCluster, used to
train a tiny U-Net that sees B-scans at half size (MLflow in SQLite) and segmented (probabilities back at
full size), once per module; the tests check each stage.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from ome_zarr_models.v05 import Image as OmeImage
from ome_zarr_models.v05 import ImageLabel as OmeImageLabel
from PIL import Image
from scipy import ndimage

from octseg.flows.config import IngestConfig, PreprocessConfig, SegmentConfig, TrainFlowConfig
from octseg.flows.ingest import ingest_volumes
from octseg.flows.preprocess import preprocess_archive
from octseg.flows.segment import segment_archive
from octseg.flows.train import train_unet
from octseg.tasks.archive.store import open_archive

SUBJECT = "duke_dme_subject01_volume"  # volume id = folder name
FLUID = "images"  # duke_dme_fluid/images: the folder name is the volume id
BSCAN_HW = (496, 768)  # Heidelberg Spectralis B-scan (depth, A-scans)
N_BSCANS = {SUBJECT: 61, FLUID: 66}
FILL_MIN_PIXELS = 1000  # a registration fill triangle, not a sliver of a few saturated pixels
TINY_UNET = {"base_channels": 4, "depth": 2, "scale_y": 0.5, "scale_x": 0.5}  # sees B-scans at 248 x 384


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory) -> Iterator[dict]:
    """Ingest, preprocess, train (tiny) and segment both real volumes once; keep the summaries.

    Torch runs on one thread here: on a busy 2-core machine two intra-op threads made inference of
    the tiny U-Net 2.6x slower (0.55 s instead of 0.21 s per B-scan).
    """
    import torch

    root = tmp_path_factory.mktemp("real")
    archive, tracking, qc = root / "duke.zarr", f"sqlite:///{root / 'mlflow.db'}", root / "qc"
    fluid = shared_data / "duke_dme_fluid"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ingest = ingest_volumes(IngestConfig(sources=(shared_data / SUBJECT, fluid / "images"), archive=archive,
                                             labels=fluid / "masks"))
        preprocess = preprocess_archive(PreprocessConfig(archive=archive, n_workers=2))
        train = train_unet(TrainFlowConfig(
            archive=archive, unet=TINY_UNET,
            train={"epochs": 1, "tiles_per_epoch": 8, "optimizer": "adam", "lr": 1e-3, "max_tile": 128},
            tracking_uri=tracking))
        segment = segment_archive(SegmentConfig(archive=archive, tracking_uri=tracking, qc_dir=qc,
                                                inference={"device": "cpu"}))
    finally:
        torch.set_num_threads(threads)
    yield {"data": shared_data, "archive": archive, "qc": qc, "ingest": ingest, "preprocess": preprocess,
           "train": train, "segment": segment}


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_both_volumes_ingest(run) -> None:
    assert sorted(run["ingest"].written) == sorted(N_BSCANS) and not run["ingest"].failures
    archive = open_archive(run["archive"], create=False)
    for vid, n in N_BSCANS.items():
        image = archive.image(vid)
        assert (image.shape, image.dtype) == ((n, *BSCAN_HW), np.uint8)
        assert archive.volume_meta(vid)["reader"] == "folder"


@pytest.mark.parametrize("z", [0, 1, 9, 60])  # Subject_01_{z+1}.png: natural, not lexical, order
def test_subject01_bscans_in_natural_order(run, z: int) -> None:
    image = open_archive(run["archive"], create=False).image(SUBJECT)
    expected = _png(run["data"] / SUBJECT / f"Subject_01_{z + 1}.png")
    np.testing.assert_array_equal(image[z], expected)


def test_subject01_has_no_manual_labels(run) -> None:
    archive = open_archive(run["archive"], create=False)
    assert archive.manual_labels(SUBJECT) is None
    assert archive.open_derived(SUBJECT, "weights") is None


def test_fluid_masks_are_binary_and_all_annotated(run) -> None:
    archive = open_archive(run["archive"], create=False)
    labels, annotated = archive.manual_labels(FLUID)
    assert annotated == list(range(66))  # every image has a mask file of the same name
    lab = np.asarray(labels[...])
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
    nonempty = lab.reshape(len(lab), -1).any(axis=1)
    assert 0 < nonempty.sum() < len(lab)  # about a third of the masks are empty (data README)
    # img_12.png is the 13th file in natural order; its mask is fluid where max(rgb) > 0
    np.testing.assert_array_equal(lab[12], _png(run["data"] / "duke_dme_fluid" / "masks" / "img_12.png").max(-1) > 0)
    np.testing.assert_array_equal(archive.image(FLUID)[12], _png(run["data"] / "duke_dme_fluid" / "images" / "img_12.png")[..., 0])


def _corner_fill(bscan: np.ndarray) -> list[np.ndarray]:
    """The saturated (255) regions connected to a top corner of an (H, W) B-scan, one mask each:
    the fill of a registered and rotated scan."""
    components, _ = ndimage.label(bscan == 255)
    return [components == c for c in sorted({int(components[0, 0]), int(components[0, -1])} - {0})]


def test_preprocess_computes_every_volume(run) -> None:
    assert run["preprocess"].computed == {FLUID: ["normalized", "weights"], SUBJECT: ["normalized"]}
    archive = open_archive(run["archive"], create=False)
    for vid in N_BSCANS:
        assert archive.derived_is_complete(vid, "normalized")


@pytest.mark.parametrize("vid", list(N_BSCANS))
def test_preprocess_zeroes_the_white_fill(run, vid: str) -> None:
    archive = open_archive(run["archive"], create=False)
    raw = np.asarray(archive.image(vid)[...])
    norm = np.asarray(archive.open_derived(vid, "normalized")[...])
    n_filled = 0
    for z, bscan in enumerate(raw):
        fills = [f for f in _corner_fill(bscan) if f.sum() >= FILL_MIN_PIXELS]
        if not fills:
            continue
        n_filled += 1
        fill = np.any(fills, axis=0)
        assert np.all(norm[z][fill] == 0.0), z
        tissue = norm[z][~fill]
        assert abs(float(tissue.mean())) < 0.05 and abs(float(tissue.std()) - 1.0) < 0.05, z
    assert n_filled > len(raw) // 2  # most B-scans were rotated during registration
    assert np.isfinite(norm).all()


@pytest.mark.parametrize("vid", list(N_BSCANS))
def test_preprocess_zeroes_small_corner_fill_too(run, vid: str) -> None:
    archive = open_archive(run["archive"], create=False)
    raw = np.asarray(archive.image(vid)[...])
    norm = np.asarray(archive.open_derived(vid, "normalized")[...])
    for z, bscan in enumerate(raw):
        for fill in _corner_fill(bscan):
            assert np.all(norm[z][fill] == 0.0), z


def test_weights_cover_annotated_fluid(run) -> None:
    archive = open_archive(run["archive"], create=False)
    weights = np.asarray(archive.open_derived(FLUID, "weights")[...])
    assert weights.shape == (66, *BSCAN_HW) and weights.min() >= 1.0  # every B-scan is annotated


def test_tiny_model_registered(run) -> None:
    train = run["train"]
    assert (train.model_name, train.model_version, train.promoted) == ("octseg-unet", "1", True)
    assert train.n_train > 0 and train.n_val > 0
    assert np.isnan(train.score) or 0.0 <= train.score <= 1.0


def test_predictions_with_provenance_and_qc(run) -> None:
    segment = run["segment"]
    assert sorted(segment.segmented) == sorted(N_BSCANS) and not segment.failures
    archive = open_archive(run["archive"], create=False)
    for vid, n in N_BSCANS.items():
        pred = archive.prediction(vid)
        assert (pred.shape, pred.dtype) == ((n, *BSCAN_HW), np.uint8)
        assert set(np.unique(pred[...])) <= {0, 1}
        info = archive.prediction_info(vid)
        assert (info["model_name"], str(info["model_version"])) == ("octseg-unet", "1")
        assert info["run_id"] == run["train"].run_id
        (qc,) = run["qc"].glob(f"{vid}_bscan*.png")
        assert _png(qc).shape == (*BSCAN_HW, 3)


@pytest.mark.parametrize("vid", list(N_BSCANS))
def test_archive_validates_and_reads_with_ome_zarr(run, vid: str) -> None:
    path = run["archive"] / vid
    image = OmeImage.from_zarr(zarr.open_group(path, mode="r"))
    names = ["prediction"] if vid == SUBJECT else ["manual", "prediction"]
    assert image.labels is not None and sorted(image.labels.label_paths) == names
    for name in names:
        OmeImageLabel.from_zarr(zarr.open_group(path / "labels" / name, mode="r"))
    nodes = list(Reader(parse_url(str(path)))())
    assert any(isinstance(s, Multiscales) for s in nodes[0].specs)
    assert nodes[0].data[0].shape == (N_BSCANS[vid], *BSCAN_HW)
    labels = {n.zarr.basename(): n for n in nodes if any(isinstance(s, Label) for s in n.specs)}
    assert sorted(labels) == names
    assert labels["prediction"].data[0].shape == (N_BSCANS[vid], *BSCAN_HW)
