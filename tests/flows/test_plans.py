"""A command with nothing to do answers from the catalogue, without loading MLflow, Zarr, Dask or Prefect, and
the registered version it peeks at is the one MLflow resolves."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from octseg.flows.plans import ModelVersion, registered_version
from octseg.tasks.archive.store import open_archive
from octseg.tasks.tracking.models import resolve_model


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """Two versions of a tiny U-Net in a SQLite MLflow, the second the champion."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from octseg.tasks.tracking.models import log_unet
    from octseg.tasks.tracking.uri import ensure_experiment, using_tracking_uri
    from octseg.unet.model import UNet

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    torch.manual_seed(0)
    with using_tracking_uri(uri), mlflow.start_run(experiment_id=ensure_experiment(uri, "plans")):
        for _ in range(2):
            version = log_unet(UNet(base_channels=4, depth=2), "octseg-unet",
                               metadata={"class_names": {"0": "background", "1": "fluid"}})
    MlflowClient(uri).set_registered_model_alias("octseg-unet", "champion", version)
    return uri


def test_the_peeked_version_is_mlflows(registry: str, tmp_path: Path) -> None:
    ref = resolve_model("models:/octseg-unet@champion", registry)
    assert registered_version("models:/octseg-unet@champion", registry) == ModelVersion("octseg-unet", ref.version)
    assert registered_version("models:/octseg-unet/1", registry) == ModelVersion("octseg-unet", "1")
    # anything it cannot tell is left to MLflow: no alias, no file, another scheme, a server that is not there
    assert registered_version("models:/octseg-unet@nope", registry) is None
    assert registered_version("models:/other@champion", registry) is None
    assert registered_version("models:/octseg-unet@champion", f"sqlite:///{tmp_path / 'none.db'}") is None
    assert registered_version("runs:/abc/model", registry) is None
    t0 = time.perf_counter()
    assert registered_version("models:/octseg-unet@champion", "http://127.0.0.1:9") is None
    assert time.perf_counter() - t0 < 6


def test_a_no_op_segment_loads_no_mlflow(registry: str, tmp_path: Path) -> None:
    from octseg.tasks.segmentation.segment import segment_one
    from octseg.tasks.tracking.models import load_unet
    from octseg.unet.config import InferenceConfig

    archive = open_archive(tmp_path / "a.zarr")
    archive.write_volume("v", np.zeros((2, 32, 32), np.uint8),
                         provenance={"source": "x", "source_sha256": "0" * 64, "reader": "npy"})
    ref = resolve_model("models:/octseg-unet@champion", registry)
    info = {"model_name": ref.name, "model_version": ref.version, "run_id": ref.run_id, "model_uri": ref.uri}
    segment_one(archive.path, "v", load_unet(ref, registry, "cpu"), info, {0: "background", 1: "fluid"},
                InferenceConfig(device="cpu"))
    code = ("import sys\nfrom octseg.flows.cli import main\nsys.argv = ['octseg', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in ('mlflow', 'zarr', 'dask', 'prefect', 'torch') if m in sys.modules)\n"
            "print('HEAVY', heavy)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code, "segment", "--archive", str(archive.path), "--tracking-uri",
                           registry], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OCTSEG_PROGRESS": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 segmented, 1 already done" in done.stdout and f"v{ref.version}" in done.stdout
    assert "HEAVY []" in done.stdout, done.stdout


def _heavy_run(args: list[str]) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom octseg.flows.cli import main\nsys.argv = ['octseg', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in ('mlflow', 'zarr', 'dask', 'prefect', 'torch') if m in sys.modules)\n"
            "print('HEAVY', heavy)\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OCTSEG_PROGRESS": "0"})


def test_a_no_op_preprocess_of_volumes_labelled_by_their_source_reads_no_volume(tmp_path: Path) -> None:
    """Manual labels that came inside the source file (a .mat of Duke's, no --labels): their digest is written
    with them, so the weight maps' fingerprint is known from the catalogue; a volume written before that digest
    existed is still judged right, from its labels."""
    import hashlib
    import json

    from octseg.flows.config import PreprocessConfig
    from octseg.flows.plans import plan_preprocess
    from octseg.tasks.archive.catalogue import _CATALOGUES, catalogue_for, catalogue_path
    from octseg.tasks.preprocess.derive import preprocess_volume

    archive = open_archive(tmp_path / "a.zarr")
    lab = np.zeros((3, 32, 32), np.uint8)
    lab[0, 4:12, 6:20], lab[2, 20:30, 1:5] = 1, 2
    archive.write_volume("v", np.arange(3 * 32 * 32, dtype=np.uint16).reshape(3, 32, 32), manual_labels=lab,
                         annotated=[0, 2], provenance={"source": "x.mat", "source_sha256": "0" * 64, "reader": "mat"})
    by_hand = hashlib.sha256(np.asarray([0, 2], dtype=np.int64).tobytes())
    for z in (0, 2):
        by_hand.update(lab[z].tobytes())
    assert archive.labels_fingerprint("v") == by_hand.hexdigest()  # what preprocessing always named them by
    preprocess_volume(archive.path, "v")
    done = _heavy_run(["preprocess", "--archive", str(archive.path)])
    assert done.returncode == 0 and "0 volumes computed, 1 up to date" in done.stdout, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout, done.stdout  # no Zarr: no volume opened

    manual = archive.path / "v" / "labels" / "manual" / "zarr.json"  # as an older octseg wrote it
    doc = json.loads(manual.read_text())
    del doc["attributes"]["octseg"]["labels_digest"]
    manual.write_text(json.dumps(doc))
    catalogue_path(archive.path).unlink()
    _CATALOGUES.clear()
    assert plan_preprocess(PreprocessConfig(archive=archive.path, dask_address=None))[0] == []
    assert archive.labels_fingerprint("v") == by_hand.hexdigest()
    lab[0, 0, 0] = 1  # new labels (ingest writes the volume again): a new digest, so new weight maps
    archive.write_volume("v", np.arange(3 * 32 * 32, dtype=np.uint16).reshape(3, 32, 32), manual_labels=lab,
                         annotated=[0, 2], provenance={"source": "x.mat", "source_sha256": "0" * 64, "reader": "mat"})
    assert archive.labels_fingerprint("v") != by_hand.hexdigest()
    assert catalogue_for(archive.path).entries(["v"])["v"].labels_digest == archive.labels_fingerprint("v")
    assert plan_preprocess(PreprocessConfig(archive=archive.path, dask_address=None))[0] == ["v"]


def test_volumes_named_to_train_on_must_be_annotated(tmp_path: Path) -> None:
    """By default training takes the annotated volumes; a volume named with --volume that has no annotated
    B-scan is an error, not a volume silently left out."""
    from octseg.flows.config import TrainFlowConfig
    from octseg.flows.plans import training_volumes

    archive = open_archive(tmp_path / "a.zarr")
    image = np.zeros((2, 16, 16), np.uint8)
    for vid, labels in (("labelled", np.ones_like(image)), ("plain", None)):
        archive.write_volume(vid, image, manual_labels=labels, annotated=[0, 1] if labels is not None else None,
                             provenance={"source": f"{vid}.tif", "source_sha256": vid[0] * 64, "reader": "tiff"})
    assert training_volumes(TrainFlowConfig(archive=archive.path))[0] == ["labelled", "plain"]
    assert training_volumes(TrainFlowConfig(archive=archive.path, volumes=("labelled",)))[0] == ["labelled"]
    with pytest.raises(ValueError, match=r"no annotated B-scans: \['plain'\]"):
        training_volumes(TrainFlowConfig(archive=archive.path, volumes=("labelled", "plain")))
    # the annotated volume is the evaluation set: said before any run, not "ingest with --labels"
    with pytest.raises(ValueError, match=r"evaluation set \['labelled'\] is held out .* no other volume has annotated"):
        training_volumes(TrainFlowConfig(archive=archive.path, evaluation_volumes=("labelled",)))


def test_training_takes_one_volume_per_scan_and_none_of_the_evaluation_sets(tmp_path: Path) -> None:
    """Two volumes of one scan (a copy, or two graders' masks): by default the first id trains, the other is left
    out; a training volume holding an evaluation volume's scan is refused."""
    from octseg.flows.config import TrainFlowConfig
    from octseg.flows.plans import training_volumes

    archive = open_archive(tmp_path / "a.zarr")
    image = np.zeros((2, 16, 16), np.uint8)
    for vid, sha in (("a", "1"), ("a_grader2", "1"), ("b", "2"), ("c", "3")):
        archive.write_volume(vid, image, manual_labels=np.ones_like(image), annotated=[0, 1],
                             provenance={"source": f"{vid}.tif", "source_sha256": sha * 64, "reader": "tiff"})
    assert training_volumes(TrainFlowConfig(archive=archive.path))[0] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"volumes \['a'\] hold the same scans as evaluation volumes"):
        training_volumes(TrainFlowConfig(archive=archive.path, evaluation_volumes=("a_grader2",)))
    assert training_volumes(TrainFlowConfig(archive=archive.path, evaluation_volumes=("c",))) == (["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"--folds 3 needs as many annotated volumes, but the evaluation set "
                                         r"\['c'\] is held out of training; 2 remain"):
        training_volumes(TrainFlowConfig(archive=archive.path, evaluation_volumes=("c",), folds=3))
