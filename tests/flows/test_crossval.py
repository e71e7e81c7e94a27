"""``octseg train --folds K``: K models with whole volumes held out, registered as one ensemble with its
out-of-fold scores; on real components (Prefect test harness, Zarr under tmp_path, MLflow in SQLite)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from octseg.flows.config import IngestConfig, SegmentConfig, TrainFlowConfig
from octseg.flows.ingest import ingest_volumes
from octseg.flows.segment import segment_archive
from octseg.flows.train import train_unet
from octseg.tasks.archive.store import open_archive
from octseg.tasks.synthetic.phantom import write_phantom_files
from tests.flows.cli_runner import invoke

VOLUMES = ["phantom_000", "phantom_001", "phantom_002"]
TINY = dict(unet={"base_channels": 4, "depth": 2},
            train={"epochs": 2, "tiles_per_epoch": 8, "optimizer": "adam", "lr": 3e-3, "max_tile": 64,
                   "lr_schedule": "poly"})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("crossval")
    sources = write_phantom_files(root / "scans", n_volumes=3, fmt="tiff", seed=3, n_bscans=4, height=64, width=96)
    archive = root / "a.zarr"
    ingest_volumes(IngestConfig(sources=tuple(sources), archive=archive, labels=root / "scans" / "labels"))
    return {"root": root, "archive": archive, "tracking": f"sqlite:///{root / 'mlflow.db'}"}


def _config(work, **kw) -> TrainFlowConfig:
    return TrainFlowConfig(archive=work["archive"], tracking_uri=work["tracking"], folds=3, **{**TINY, **kw})


def _runs(work, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(work["tracking"])
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    return client, parent, children


def test_folds_register_one_ensemble_scored_out_of_fold(work) -> None:
    from octseg.tasks.tracking.models import resolve_model

    summary = train_unet(_config(work))
    assert summary.folds == 3 and summary.promoted and summary.model_version == "1"
    assert sorted(summary.oof["per_subject"]) == VOLUMES and 0.0 <= summary.score <= 1.0
    lo, hi = summary.oof["interval"]
    assert lo <= summary.score <= hi
    ref = resolve_model("models:/octseg-unet@champion", work["tracking"])
    assert ref.members == 3 and ref.postprocess is not None  # one version: the three fold models
    assert ref.tta  # averaged over folds and flips
    assert sorted(ref.trained_on) == VOLUMES and all(len(d) == 64 for d in ref.trained_on.values())  # for evaluate
    client, parent, children = _runs(work, summary.run_id)
    assert parent.data.tags["octseg.score_source"] == "out-of-fold"
    assert parent.data.metrics["registered_oof_dice_fluid"] == pytest.approx(summary.score)
    assert {"oof_dice_fluid", "oof_raw_dice_fluid", "oof_dice_fluid_ci_low", "oof_false_alarm_bscans"} <= set(
        parent.data.metrics)
    held = [c.data.params["held_out"].split(",") for c in children]
    assert sorted(v for h in held for v in h) == VOLUMES  # every volume held out by exactly one fold
    for c in children:  # ... and that fold trained on the others only
        n_held = sum(len(open_archive(work["archive"], create=False).manual_labels(v)[1])
                     for v in c.data.params["held_out"].split(","))
        total = sum(len(open_archive(work["archive"], create=False).manual_labels(v)[1]) for v in VOLUMES)
        assert int(c.data.params["n_train"]) == total - n_held
    oof = json.loads(Path(client.download_artifacts(summary.run_id, "crossval/oof.json", str(work["root"]))).read_text())
    assert oof["postprocessed"]["pooled"] == pytest.approx(summary.score) and len(oof["nested_min_sizes"]) == 3


def test_a_rerun_reuses_the_cross_validation(work) -> None:
    first = train_unet(_config(work))
    assert first.reused and first.folds == 3 and first.model_version == "1"


def test_segment_uses_the_ensemble(work) -> None:
    summary = segment_archive(SegmentConfig(archive=work["archive"], tracking_uri=work["tracking"],
                                            qc_dir=work["root"] / "qc"))
    assert sorted(summary.segmented) == VOLUMES and not summary.failures
    archive = open_archive(work["archive"], create=False)
    assert archive.prediction("phantom_000").shape == (4, 64, 96)
    info = archive.prediction_info("phantom_000")
    assert str(info["model_version"]) == "1" and info["report"]["tta"] is True  # the ensemble's own choice
    forced = segment_archive(SegmentConfig(archive=work["archive"], tracking_uri=work["tracking"], force=True,
                                           volumes=("phantom_000",), inference={"tta": False}))
    assert forced.segmented == ["phantom_000"]
    assert open_archive(work["archive"], create=False).prediction_info("phantom_000")["report"]["tta"] is False


def test_a_killed_cross_validation_continues_from_the_next_fold(work, tmp_path) -> None:
    """Fold 0 finishes, the run dies in fold 1; the rerun keeps fold 0 and trains folds 1 and 2 only."""
    from octseg.tasks.training.crossval import crossval_and_register
    from octseg.tasks.training.dataset import load_volume_sets
    from octseg.unet.config import TrainConfig, UNetConfig

    sets = load_volume_sets(work["archive"], VOLUMES)
    unet, train = UNetConfig(**TINY["unet"]), TrainConfig(**{**TINY["train"], "seed": 7})
    tracking = f"sqlite:///{tmp_path / 'm.db'}"
    seen = []

    def dies_in_fold_1(stats) -> None:
        seen.append(stats.epoch)
        if len(seen) > train.epochs:  # the first epoch of the second fold
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        crossval_and_register(sets, unet, train, 3, tracking_uri=tracking, experiment="e", model_name="m",
                              progress=dies_in_fold_1)
    result = crossval_and_register(sets, unet, train, 3, tracking_uri=tracking, experiment="e", model_name="m")
    client, parent, children = _runs({"tracking": tracking}, result.run_id)
    folds = sorted(c.data.tags["octseg.fold"] for c in children)
    assert folds == ["0", "1", "1", "2"]  # fold 0 once; fold 1 again after the kill; fold 2
    assert result.model_version == "1" and result.folds == 3


def test_folds_are_checked_before_any_run(work) -> None:
    result = invoke("train", "--archive", str(work["archive"]), "--tracking-uri", work["tracking"], "--folds", "5",
                    "--epochs", "1")
    assert result.exit_code == 2 and "folds <= subjects (3), got folds=5" in result.plain
    with pytest.raises(ValueError, match=r"drop --val-volume \(val_volumes\)"):
        _config(work, val_volumes=("phantom_000",))


def test_out_of_fold_post_processing_is_nested() -> None:
    """The reported figure applies to each fold the choice made on the other folds only."""
    from octseg.tasks.training.crossval import _nested_postprocess

    truth = {v: np.zeros((1, 20, 20), np.uint8) for v in "abc"}
    for t in truth.values():
        t[0, 5:15, 5:15] = 1
    oof = {v: t.copy() for v, t in truth.items()}
    oof["a"][0, 0, 0] = oof["b"][0, 19, 19] = 1  # specks in a and b; c is clean
    processed, chosen = _nested_postprocess(oof, truth, [["a"], ["b"], ["c"]])
    assert chosen[2] > 0 and chosen[0] > 0 and chosen[1] > 0  # the others show specks each time
    assert processed["a"][0, 0, 0] == 0 and (processed["c"] == truth["c"]).all()


def test_several_models_a_fold_are_one_ensemble_of_folds_times_models(work) -> None:
    import torch

    from octseg.tasks.tracking.models import load_unet, resolve_model
    from octseg.unet.ensemble import UNetEnsemble

    summary = train_unet(_config(work, fold_models=2, model_name="two-a-fold"))
    assert not summary.reused and summary.folds == 3  # another fingerprint than one model a fold
    ref = resolve_model("models:/two-a-fold@champion", work["tracking"])
    assert ref.members == 6
    _, parent, children = _runs(work, summary.run_id)
    assert parent.data.params["fold_models"] == "2" and {c.data.params["fold_models"] for c in children} == {"2"}
    ensemble = load_unet(ref, work["tracking"])
    assert isinstance(ensemble, UNetEnsemble)
    first = [m.state_dict() for m in ensemble.members]
    for a, b in zip(first[0::2], first[1::2]):  # the two models of a fold started from their own weights
        assert any(not torch.equal(a[k], b[k]) for k in a)
    from octseg.flows.plans import previous_training

    assert previous_training(_config(work, fold_models=2, model_name="two-a-fold"), work["tracking"]).reused
    assert previous_training(_config(work, fold_models=3, model_name="two-a-fold"), work["tracking"]) is None
    assert previous_training(_config(work, fold_models=2), work["tracking"]) is None  # octseg-unet: one a fold
    with pytest.raises(ValueError, match="fold_models needs folds"):
        TrainFlowConfig(archive=work["archive"], fold_models=2)


def test_a_fold_whose_model_predicts_no_fluid_is_named() -> None:
    from octseg.tasks.training.crossval import silent_folds

    fluid, empty = np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8)
    fluid[0, 2:4, 2:4] = 1
    truths = {"a": fluid, "b": empty, "c": fluid, "d": empty}
    oof = {"a": empty, "b": empty, "c": fluid, "d": empty}  # fold 1 learnt nothing; fold 2 found the fluid
    (line,) = silent_folds([["a", "b"], ["c", "d"]], oof, truths, "fluid")
    assert line.startswith("fold-0 (its MLflow run): its model predicts no fluid anywhere in ['a', 'b'], which hold 4 "
                           "fluid pixels")
    assert silent_folds([["b", "d"]], {"b": empty, "d": empty}, truths, "fluid") == []  # nothing to find: no warning
