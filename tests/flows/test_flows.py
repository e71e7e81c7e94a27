"""The four flows and the pipeline on real components: Prefect (test harness), a Dask LocalCluster,
Zarr under tmp_path and MLflow in a SQLite file. Built once per module, checked step by step."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from octseg.flows.config import IngestConfig, PreprocessConfig, SegmentConfig, TrainFlowConfig
from octseg.flows.ingest import ingest_volumes
from octseg.flows.preprocess import preprocess_archive
from octseg.flows.runs import summary_of
from octseg.flows.segment import segment_archive
from octseg.flows.train import train_unet
from octseg.tasks.archive.store import open_archive
from octseg.tasks.synthetic.phantom import write_phantom_files

SHAPE = dict(n_bscans=4, height=64, width=96)


def _recorded_states(flow_state) -> tuple[str, dict[str, str]]:
    """The flow run's final state type and its task runs' (name -> state type), read back from Prefect."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_state.state_details.flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return run.state.type.value, {t.name: t.state.type.value for t in tasks}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Phantom files plus one of each kind of bad input, and the locations of archive and MLflow."""
    root = tmp_path_factory.mktemp("flows")
    scans = root / "scans"
    good = write_phantom_files(scans, n_volumes=3, fmt="tiff", seed=0, **SHAPE)
    bad = {
        "empty.tif": b"",
        "truncated.tif": (scans / "phantom_000.tif").read_bytes()[:300],
        "notes.png": b"this is not an image\n",
    }
    for name, data in bad.items():
        (scans / name).write_bytes(data)
    # an image whose mask has the wrong shape
    tifffile.imwrite(scans / "wrongmask.tif", np.zeros((4, 64, 96), np.uint8), photometric="minisblack")
    tifffile.imwrite(scans / "labels" / "wrongmask.tif", np.zeros((4, 32, 96), np.uint8), photometric="minisblack")
    return {
        "root": root,
        "good": good,
        "bad": [scans / n for n in [*bad, "wrongmask.tif"]],
        "labels": scans / "labels",
        "archive": root / "archive.zarr",
        "tracking": f"sqlite:///{root / 'mlflow.db'}",
    }


def _train_config(work, **kw) -> TrainFlowConfig:
    defaults = dict(archive=work["archive"], unet={"base_channels": 4, "depth": 2},
                    train={"epochs": 2, "tiles_per_epoch": 8, "optimizer": "adam", "lr": 1e-3, "max_tile": 64},
                    tracking_uri=work["tracking"])
    return TrainFlowConfig(**{**defaults, **kw})


def test_ingest_lands_good_files_and_reports_bad_ones(work):
    state = ingest_volumes(IngestConfig(sources=(*work["good"], *work["bad"]), archive=work["archive"],
                                        labels=work["labels"]), return_state=True)
    summary = summary_of(state)
    assert sorted(summary.written) == ["phantom_000", "phantom_001", "phantom_002"]
    # Prefect saw it: each bad file is a Failed task run, the good ones Completed, the flow run Failed
    flow_state, task_states = _recorded_states(state)
    assert flow_state == "FAILED" and state.is_failed()
    for path in work["bad"]:
        assert task_states[f"ingest-{path}"] == "FAILED", task_states
    for path in work["good"]:
        assert task_states[f"ingest-{path}"] == "COMPLETED", task_states
    assert all(path.name in state.message for path in work["bad"])  # the run's message names each failure
    assert len(summary.failures) == 4
    for path in work["bad"]:
        assert any(path.name in f for f in summary.failures), (path.name, summary.failures)
    assert any("shape" in f for f in summary.failures if "wrongmask" in f)
    assert open_archive(work["archive"], create=False).volume_ids() == ["phantom_000", "phantom_001", "phantom_002"]
    staging = [p for p in work["archive"].parent.iterdir() if "staging" in p.name]
    assert all(not any(p.iterdir()) for p in staging)  # nothing half-written anywhere


def test_ingest_rerun_does_no_repeated_work(work):
    summary = ingest_volumes(IngestConfig(sources=tuple(work["good"]), archive=work["archive"], labels=work["labels"]))
    assert summary.written == [] and sorted(summary.skipped) == ["phantom_000", "phantom_001", "phantom_002"]


def test_preprocess_on_a_local_cluster_then_skips(work):
    cfg = PreprocessConfig(archive=work["archive"], n_workers=2)
    first = preprocess_archive(cfg)
    assert set(first.computed) == {"phantom_000", "phantom_001", "phantom_002"}
    assert all(v == ["normalized", "weights"] for v in first.computed.values())
    archive = open_archive(work["archive"], create=False)
    weights = np.asarray(archive.open_derived("phantom_000", "weights")[...])
    _, annotated = archive.manual_labels("phantom_000")
    assert weights[annotated].min() >= 1.0 and weights[annotated].max() > 2.0  # border term present
    second = preprocess_archive(cfg)
    assert second.computed == {} and sorted(second.up_to_date) == ["phantom_000", "phantom_001", "phantom_002"]


def test_train_registers_a_champion_and_a_rerun_reuses_it(work):
    summary = train_unet(_train_config(work))
    assert summary.model_version == "1" and summary.promoted and not summary.reused
    assert 0.0 <= summary.score <= 1.0
    again = train_unet(_train_config(work))  # same data, same settings: nothing to train
    assert again.reused and again.run_id == summary.run_id and again.model_version == "1"
    assert again.score == pytest.approx(summary.score)


def test_segment_writes_predictions_then_skips(work):
    cfg = SegmentConfig(archive=work["archive"], tracking_uri=work["tracking"], qc_dir=work["root"] / "qc")
    first = segment_archive(cfg)
    assert sorted(first.segmented) == ["phantom_000", "phantom_001", "phantom_002"] and not first.failures
    archive = open_archive(work["archive"], create=False)
    info = archive.prediction_info("phantom_001")
    assert info["model_name"] == "octseg-unet" and str(info["model_version"]) == "1"
    assert archive.prediction("phantom_001").shape == (4, 64, 96)
    assert len(list((work["root"] / "qc").glob("*.png"))) == 3
    second = segment_archive(cfg)
    assert second.segmented == [] and len(second.skipped) == 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def external_scheduler(tmp_path):
    """``dask scheduler`` and one ``dask worker`` declaring GPU=1 (a CPU stand-in), as separate processes."""
    import subprocess
    import sys
    import time

    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                               address.rsplit(":", 1)[1], "--no-dashboard"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                   "--resources", "GPU=1", "--no-dashboard", "--local-directory", str(tmp_path)],
                                  cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(1, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=60)


def test_segment_labels_are_identical_in_process_on_a_local_cluster_and_an_external_scheduler(work, external_scheduler):
    """Volumes as Dask tasks: the flow's own process, a 2-worker LocalCluster and a separate scheduler whose
    worker declares GPU=1 (so each volume asks for it) write byte-identical labels; Prefect shows each volume."""
    from octseg.tasks.runtime.cluster import close_clients

    labels = {}
    for mode, extra in {"in-process": {"n_workers": 0}, "local-cluster": {"n_workers": 2},
                        "external": {"dask_address": external_scheduler}}.items():
        cfg = SegmentConfig(archive=work["archive"], tracking_uri=work["tracking"], force=True, **extra)
        state = segment_archive(cfg, return_state=True)
        summary = summary_of(state)
        assert sorted(summary.segmented) == ["phantom_000", "phantom_001", "phantom_002"], (mode, summary.failures)
        flow_state, task_states = _recorded_states(state)
        assert flow_state == "COMPLETED" and all(task_states[f"segment-phantom_00{i}"] == "COMPLETED" for i in range(3))
        archive = open_archive(work["archive"], create=False)
        labels[mode] = {v: np.asarray(archive.prediction(v)[...]).tobytes() for v in summary.segmented}
        assert Path(summary.report).name == "segmentation.csv"
    close_clients()
    assert labels["in-process"] == labels["local-cluster"] == labels["external"]


def test_segment_with_unknown_alias_fails_before_writing(work):
    cfg = SegmentConfig(archive=work["archive"], tracking_uri=work["tracking"], model_uri="models:/octseg-unet@nope",
                        force=True)
    before = open_archive(work["archive"], create=False).prediction_info("phantom_000")
    with pytest.raises(ValueError, match="nope"):
        segment_archive(cfg)
    assert open_archive(work["archive"], create=False).prediction_info("phantom_000") == before


def test_pipeline_rerun_over_a_finished_archive_does_nothing(work):
    """The four stages chained: after the flows above, every stage finds its work done."""
    from octseg.flows.config import PipelineConfig
    from octseg.flows.pipeline import run_pipeline

    cfg = PipelineConfig(
        ingest=IngestConfig(sources=tuple(work["good"]), archive=work["archive"], labels=work["labels"]),
        preprocess=PreprocessConfig(archive=work["archive"], n_workers=1),
        train=_train_config(work),
        segment=SegmentConfig(archive=work["archive"], tracking_uri=work["tracking"], qc_dir=work["root"] / "qc"),
    )
    state = run_pipeline(cfg, return_state=True)
    assert state.is_completed()
    summary = summary_of(state)
    assert summary.ingest.written == [] and len(summary.ingest.skipped) == 3
    assert summary.preprocess.computed == {}
    assert summary.train.reused and summary.train.model_version == "1"
    assert summary.segment.segmented == [] and len(summary.segment.skipped) == 3


def test_preprocess_goes_on_past_a_broken_volume(tmp_path):
    from octseg.tasks.synthetic.phantom import make_phantom_volume

    archive = open_archive(tmp_path / "a.zarr")
    for vid in ("good", "broken"):
        archive.write_volume(vid, make_phantom_volume(3, 40, 48, seed=1).image,
                             provenance={"source": vid, "source_sha256": vid, "reader": "test"})
    shards = [p for p in (tmp_path / "a.zarr" / "broken" / "s0").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert shards
    for p in shards:
        p.write_bytes(p.read_bytes()[:20])  # a truncated shard: the volume cannot be decoded
    state = preprocess_archive(PreprocessConfig(archive=tmp_path / "a.zarr", n_workers=1), return_state=True)
    summary = summary_of(state)
    assert list(summary.computed) == ["good"]
    assert len(summary.failures) == 1 and summary.failures[0].startswith("broken:")
    flow_state, task_states = _recorded_states(state)
    assert flow_state == "FAILED"
    assert task_states == {"preprocess-good": "COMPLETED", "preprocess-broken": "FAILED"}
    assert not archive.derived_is_complete("broken", "normalized")


def test_evaluate_scores_the_champion_on_annotated_bscans_and_reports(work):
    """Pooled scores equal a direct computation (same predictions, one confusion matrix over the
    concatenated annotated B-scans); the report lands beside the archive and in the model's run, and says
    that the volumes named trained the model."""
    from mlflow import MlflowClient

    from octseg.flows.config import EvaluateConfig
    from octseg.flows.evaluate import evaluate_model
    from octseg.tasks.preprocess.normalized import normalized_bscans
    from octseg.tasks.tracking.models import load_unet, resolve_model
    from octseg.unet.config import InferenceConfig
    from octseg.unet.inference import segment_volume
    from octseg.unet.metrics import dice_per_class

    volumes = ("phantom_000", "phantom_001")
    state = evaluate_model(EvaluateConfig(archive=work["archive"], tracking_uri=work["tracking"], volumes=volumes),
                           return_state=True)
    assert state.is_completed(), state.message
    summary = summary_of(state)
    archive = open_archive(work["archive"], create=False)
    ref = resolve_model("models:/octseg-unet@champion", work["tracking"])
    model = load_unet(ref, work["tracking"])
    preds, truths = [], []
    for vid in volumes:  # the slow, obvious reference
        labels, annotated = archive.manual_labels(vid)
        idx = sorted(annotated)
        preds.append(segment_volume(model, normalized_bscans(archive, vid, idx), InferenceConfig()))
        truths.append(np.asarray(labels.get_orthogonal_selection((idx,))))
    expected = dice_per_class(np.concatenate(preds), np.concatenate(truths), 2)
    assert summary.volumes == list(volumes)
    assert summary.dice["fluid"] == pytest.approx(expected[1]) and summary.dice["background"] == pytest.approx(expected[0])
    report = Path(summary.report)
    assert report.parent == work["archive"].with_name("archive.zarr.reports")
    assert {p.name for p in report.iterdir()} == {"report.md", "scores.json", "per_volume_dice.png", "worst_bscans.png"}
    assert "| fluid |" in (report / "report.md").read_text()
    # those volumes trained the model: the report says so, and the score is not recorded on the version
    assert summary.trained_on == list(volumes) and "NOT HELD OUT" in summary.headline()
    assert "Not a held-out score" in (report / "report.md").read_text()
    assert json.loads((report / "scores.json").read_text())["trained_on"] == list(volumes)
    client = MlflowClient(work["tracking"])
    tags = client.get_model_version("octseg-unet", ref.version).tags
    assert "octseg.eval_set" not in tags and "octseg.eval_score" not in tags
    logged = [a.path for a in client.list_artifacts(ref.run_id, f"evaluation/{summary.evaluation_set[:16]}")]
    assert any(p.endswith("report.md") for p in logged), logged
    _, task_states = _recorded_states(state)
    assert task_states == {"evaluate-phantom_000": "COMPLETED", "evaluate-phantom_001": "COMPLETED"}


def test_champion_is_chosen_on_the_fixed_evaluation_set(tmp_path):
    """The archive fixes an evaluation set: training holds it out, both versions are scored on it (the
    champion's score cached on its version), and the alias moves only on a better score."""
    from mlflow import MlflowClient

    from octseg.tasks.tracking.models import resolve_model

    sources = write_phantom_files(tmp_path / "scans", n_volumes=3, fmt="tiff", seed=5, **SHAPE)
    archive_path = tmp_path / "a.zarr"
    ingest_volumes(IngestConfig(sources=tuple(sources), archive=archive_path, labels=tmp_path / "scans" / "labels"))
    archive = open_archive(archive_path, create=False)
    archive.set_evaluation_set(["phantom_002"])
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = dict(archive=archive_path, unet={"base_channels": 4, "depth": 2}, tracking_uri=tracking, val_fraction=0.0)
    first = train_unet(TrainFlowConfig(**base, train={"epochs": 1, "tiles_per_epoch": 2, "optimizer": "adam",
                                                      "lr": 1e-3, "max_tile": 64, "seed": 1}))
    assert first.promoted and first.champion_version == "1" and first.eval_score is not None
    annotated = sum(len(archive.manual_labels(v)[1]) for v in ("phantom_000", "phantom_001"))
    assert first.n_train == annotated  # phantom_002 was held out of training
    v1_report = next((tmp_path / "a.zarr.reports").iterdir())
    v1_written = v1_report.stat().st_mtime_ns
    second = train_unet(TrainFlowConfig(**base, train={"epochs": 6, "tiles_per_epoch": 8, "optimizer": "adam",
                                                       "lr": 3e-3, "max_tile": 64, "seed": 2}))
    assert second.model_version == "2" and second.eval_set == first.eval_set
    assert second.promoted == (second.eval_score > first.eval_score)
    champion = resolve_model("models:/octseg-unet@champion", tracking).version
    assert champion == ("2" if second.promoted else "1") == second.champion_version
    assert v1_report.stat().st_mtime_ns == v1_written  # the champion's score came from its cache
    tags = MlflowClient(tracking).get_model_version("octseg-unet", "2").tags
    assert float(tags["octseg.eval_score"]) == pytest.approx(second.eval_score)
    assert tags["octseg.eval_set"] == second.eval_set


def test_ingest_on_an_external_dask_scheduler_equals_ingest_in_threads(tmp_path, external_scheduler):
    """``IngestConfig.dask_address``: the files are read and written by the cluster's worker process, and the
    archive is the one the flow's own threads write; a bad file still fails alone, named."""
    from octseg.flows.config import IngestConfig
    from octseg.flows.ingest import ingest_volumes
    from octseg.tasks.runtime.cluster import close_clients

    scans = tmp_path / "scans"
    files = write_phantom_files(scans, n_volumes=2, n_bscans=3, height=48, width=64)
    (scans / "broken.npy").write_bytes(b"\x93NUMPY broken")
    images = {}
    for mode, address in {"threads": None, "dask": external_scheduler}.items():
        archive = tmp_path / f"{mode}.zarr"
        cfg = IngestConfig(sources=(*files, scans / "broken.npy"), archive=archive, dask_address=address)
        summary = summary_of(ingest_volumes(cfg, return_state=True))
        assert sorted(summary.written) == ["phantom_000", "phantom_001"], (mode, summary.failures)
        (failure,) = summary.failures
        assert "broken.npy" in failure and "npy" in failure
        stored = open_archive(archive, create=False)
        images[mode] = {v: np.asarray(stored.image(v)[...]).tobytes() for v in summary.written}
    close_clients()
    assert images["threads"] == images["dask"]
