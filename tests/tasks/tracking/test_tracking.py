"""Tracking and registry against a REAL MLflow (SQLite under tmp): one run per training, champion alias,
resolve -> load round trip, helpful errors, and no artifacts outside the tmp folder."""
from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from octseg.flows.config import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME
from octseg.tasks.tracking.champion import CHAMPION, promote_if_better
from octseg.tasks.tracking.models import load_unet, log_unet, resolve_model
from octseg.tasks.tracking.uri import check_tracking_uri, ensure_experiment, resolve_tracking_uri, using_tracking_uri
from octseg.tasks.training.train import train_and_register
from octseg.unet.config import TrainConfig, UNetConfig
from octseg.unet.bscans import BScanSet
from octseg.unet.model import UNet

UNET = UNetConfig(base_channels=4, depth=2)
EPOCHS = 2
TRAIN = TrainConfig(epochs=EPOCHS, batch_size=2, tiles_per_epoch=4, optimizer="adam", lr=0.01, device="cpu")


def _bscans(n: int, seed: int) -> BScanSet:
    """n noisy 60x60 B-scans, each with a bright 20x20 square labelled 1."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.1, (n, 60, 60)).astype(np.float32)
    labels = np.zeros((n, 60, 60), dtype=np.int64)
    for i in range(n):
        y, x = rng.integers(5, 35, size=2)
        images[i, y : y + 20, x : x + 20] += 1.0
        labels[i, y : y + 20, x : x + 20] = 1
    return BScanSet(images, labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One train_and_register in a clean working directory, with a decoy $MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'db' / 'mlflow.db'}"
    (root / "db").mkdir()
    cwd, decoy = root / "cwd", f"sqlite:///{root / 'decoy.db'}"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setenv("MLFLOW_TRACKING_URI", decoy)
        seen = []
        result = train_and_register(_bscans(3, 0), _bscans(1, 1), UNET, TRAIN, tracking_uri=uri,
                                    experiment=DEFAULT_EXPERIMENT, model_name=DEFAULT_MODEL_NAME,
                                    tags={"purpose": "test"}, progress=seen.append)
        env_after = os.environ["MLFLOW_TRACKING_URI"]
    return {"root": root, "uri": uri, "cwd": cwd, "result": result, "epochs_seen": seen, "env_after": env_after}


def test_one_run_with_params_tags_and_per_epoch_metrics(trained):
    client, result = MlflowClient(trained["uri"]), trained["result"]
    experiment = client.get_experiment_by_name("octseg")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.data.params["unet.base_channels"] == "4" and run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.params["data.n_train"] == "3" and run.data.params["data.n_val"] == "1"
    assert run.data.tags["purpose"] == "test"
    assert run.data.tags["octseg.score_source"] == "validation"
    assert len(run.data.tags.get("git_commit", "0" * 40)) == 40
    for key in ("train_loss", "val_dice_fluid", "val_dice_background"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == list(range(EPOCHS)), key
    assert [s.epoch for s in trained["epochs_seen"]] == list(range(EPOCHS))  # progress callback
    # the registered weights are the best validated epoch's, and their score is what the result reports
    per_epoch = [m.value for m in client.get_metric_history(result.run_id, "val_dice_fluid")]
    best = max((v for v in per_epoch if not math.isnan(v)), default=math.nan)
    registered = run.data.metrics["registered_val_dice_fluid"]
    assert result.score == result.val_dice[1]
    assert (result.score == registered == best) or all(math.isnan(v) for v in (result.score, registered, best))
    assert run.data.tags["octseg.registered_epoch"] == str(per_epoch.index(best) if not math.isnan(best) else EPOCHS - 1)


def test_qc_image_and_model_are_stored(trained):
    client, result = MlflowClient(trained["uri"]), trained["result"]
    qc = [a.path for a in client.list_artifacts(result.run_id, "qc")]
    assert len(qc) == 1 and qc[0].endswith(".png") and result.qc_image.endswith(qc[0])
    assert Path(result.qc_image.removeprefix("file://")).is_file()
    assert (result.model_name, result.model_version, result.promoted) == (DEFAULT_MODEL_NAME, "1", True)
    version = client.get_model_version_by_alias(DEFAULT_MODEL_NAME, CHAMPION)
    assert str(version.version) == "1" and version.run_id == result.run_id


def test_everything_stays_under_tmp(trained):
    root, cwd = trained["root"], trained["cwd"]
    assert list(cwd.iterdir()) == []  # no ./mlruns, no ./mlflow.db in the working directory
    assert not (root / "decoy.db").exists()  # $MLFLOW_TRACKING_URI was not used ...
    assert trained["env_after"] == f"sqlite:///{root / 'decoy.db'}"  # ... nor overwritten
    experiment = MlflowClient(trained["uri"]).get_experiment_by_name("octseg")
    assert experiment.artifact_location == (root / "db" / "mlartifacts" / "octseg").as_uri()
    assert trained["result"].qc_image.startswith(experiment.artifact_location)


def test_resolve_alias_and_version(trained):
    uri, result = trained["uri"], trained["result"]
    by_alias = resolve_model(f"models:/{DEFAULT_MODEL_NAME}@{CHAMPION}", uri)
    by_version = resolve_model(f"models:/{DEFAULT_MODEL_NAME}/1", uri)
    assert by_alias == by_version
    assert (by_alias.version, by_alias.run_id, by_alias.uri) == ("1", result.run_id, "models:/octseg-unet/1")
    assert by_alias.unet_config == UNET.to_dict()


@pytest.mark.parametrize(
    "model_uri, message",
    [
        ("models:/nope@champion", r"no registered model 'nope' in .*octseg train"),  # unknown model
        ("models:/octseg-unet@staging", r"alias 'staging'.*versions \[1\].*'champion'"),  # unknown alias
        ("models:/octseg-unet/7", r"no version 7.*versions \[1\]"),  # unknown version
        ("runs:/abc/unet", r"models:/NAME@ALIAS or models:/NAME/VERSION"),  # not a registry URI
    ],
)
def test_resolve_errors_say_what_exists(trained, model_uri, message):
    with pytest.raises(ValueError, match=message):
        resolve_model(model_uri, trained["uri"])


def test_load_trained_model(trained):
    ref = resolve_model(f"models:/{DEFAULT_MODEL_NAME}@{CHAMPION}", trained["uri"])
    model = load_unet(ref, trained["uri"])
    assert isinstance(model, UNet) and model.config == UNET and not model.training


def _log_version(uri: str, name: str, experiment_id: str, score: float, seed: int) -> tuple[str, UNet]:
    """A registered version of a random tiny U-Net whose run reports ``val_dice_fluid = score``."""
    torch.manual_seed(seed)
    model = UNet.from_config(UNET)
    with using_tracking_uri(uri), mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_metric("val_dice_fluid", score, step=0)
        return log_unet(model, name, pip_requirements=["torch"]), model


def test_load_unet_restores_config_and_weights(trained):
    uri = trained["uri"]
    version, original = _log_version(uri, "roundtrip", ensure_experiment(uri, DEFAULT_EXPERIMENT), 0.5, seed=3)
    loaded = load_unet(resolve_model(f"models:/roundtrip/{version}", uri), uri)
    assert loaded.config == original.config
    expected, got = original.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_champion_moves_only_for_a_better_score(trained):
    uri, name = trained["uri"], "promotion"
    experiment_id = ensure_experiment(uri, DEFAULT_EXPERIMENT)
    client = MlflowClient(uri)
    champion = lambda: str(client.get_model_version_by_alias(name, CHAMPION).version)  # noqa: E731
    cases = [  # (score of the new version, promoted?, champion afterwards)
        (0.5, True, "1"),  # no champion yet: the first version always wins
        (0.3, False, "1"),  # worse than 0.5
        (0.5, False, "1"),  # a tie keeps the incumbent
        (0.7, True, "4"),  # better
        (math.nan, False, "4"),  # NaN never beats a champion
    ]
    for seed, (score, promoted, after) in enumerate(cases):
        version, _ = _log_version(uri, name, experiment_id, score, seed)
        assert promote_if_better(name, version, score, uri, metric="val_dice_fluid") is promoted, (score, version)
        assert champion() == after
    assert promote_if_better(name, "4", 0.9, uri, metric="val_dice_fluid") is False  # already champion


def test_ensure_experiment_is_idempotent_and_keeps_artifacts_beside_the_db(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = ensure_experiment(uri, "other")
    assert ensure_experiment(uri, "other") == first
    location = MlflowClient(uri).get_experiment(first).artifact_location
    assert location == (tmp_path / "mlartifacts" / "other").as_uri()


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env/mlflow.db")
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(None) == "sqlite:////env/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_without_validation_set_scores_on_training_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0f9e-flow-run")  # what prefect.runtime reads in a flow run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainConfig(epochs=1, batch_size=2, tiles_per_epoch=2, device="cpu")
    result = train_and_register(_bscans(2, 2), None, UNET, cfg, tracking_uri=uri, experiment=DEFAULT_EXPERIMENT,
                                model_name="no-val")
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.tags["octseg.score_source"] == "training"
    assert run.data.tags["prefect_flow_run_id"] == "0f9e-flow-run"
    assert "val_dice_fluid" not in run.data.metrics
    assert run.data.metrics["train_dice_fluid"] == result.score or math.isnan(result.score)
    assert result.promoted and result.n_val == 0


def test_masks_with_more_classes_than_the_network_fail_before_any_run(tmp_path):
    from mlflow import MlflowClient

    labels = np.zeros((2, 40, 40), np.int64)
    labels[:, 10:20, 10:20] = 2  # a class the 2-class network cannot predict
    data = BScanSet(np.zeros(labels.shape, np.float32), labels)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match=r"class 2 .*train with --classes 3"):
        train_and_register(data, None, UNetConfig(base_channels=4, depth=2), TrainConfig(epochs=1), tracking_uri=uri,
                           experiment=DEFAULT_EXPERIMENT, model_name=DEFAULT_MODEL_NAME)
    experiments = MlflowClient(uri).search_experiments()
    assert all(not MlflowClient(uri).search_runs([e.experiment_id]) for e in experiments)


def test_using_tracking_uri_restores_the_environment(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////before/mlflow.db")
    with using_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////before/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with using_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_check_tracking_uri(tmp_path):
    db = tmp_path / "mlflow.db"
    check_tracking_uri(f"sqlite:///{db}")  # absent, in an existing folder: MLflow creates it
    with _http_server() as port:  # anything answering is left to MLflow
        check_tracking_uri(f"http://127.0.0.1:{port}")
    with pytest.raises(ValueError, match=f"127.0.0.1:{port}: no server answers"):
        check_tracking_uri(f"http://127.0.0.1:{port}")  # gone: refused in the probe, not after minutes
    with pytest.raises(ValueError, match="unsupported scheme 'foo'"):
        check_tracking_uri("foo://bar")
    with pytest.raises(ValueError, match="no MLflow database"):
        check_tracking_uri(f"sqlite:///{db}", must_exist=True)
    with pytest.raises(ValueError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    with pytest.raises(ValueError, match="is a folder"):
        check_tracking_uri(f"sqlite:///{tmp_path}")
    db.write_text("not a database, just text\n")
    with pytest.raises(ValueError, match="is not a SQLite database") as info:
        check_tracking_uri(f"sqlite:///{db}", must_exist=True)
    assert "\n" not in str(info.value)
    db.write_bytes(b"SQLite format 3\x00" + bytes(84))  # a header and nothing else: SQLite says "not a database"
    with pytest.raises(ValueError, match="damaged SQLite database"):
        check_tracking_uri(f"sqlite:///{db}", must_exist=True)
    db.write_bytes(b"")
    os.utime(db, (time.time() - 60, time.time() - 60))
    with pytest.raises(ValueError, match="is an empty file, not an MLflow database"):
        check_tracking_uri(f"sqlite:///{db}")
    db.unlink()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE experiments (experiment_id INTEGER)")
    check_tracking_uri(f"sqlite:///{db}", must_exist=True)


def test_a_tracking_store_that_cannot_work_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in (f"file://{tmp_path}/mlruns", str(tmp_path / "mlruns")):  # MLflow 3 refuses its folder store
        with pytest.raises(ValueError, match="maintenance mode .* MLFLOW_ALLOW_FILE_STORE=true"):
            check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(f"file://{tmp_path}/mlruns")  # allowed again: MLflow takes it
    from octseg.flows.preflight import check_tracking_writable

    db = tmp_path / "mlflow.db"
    check_tracking_writable(f"sqlite:///{db}")  # absent, in a folder that takes files
    if Path("/proc/self").is_dir():  # a folder that takes no new file (as an immutable or read-only one)
        check_tracking_uri("sqlite:////proc/mlflow.db")  # reading: a missing database is MLflow's to report
        with pytest.raises(ValueError, match="the database's folder /proc is not writable") as info:
            check_tracking_writable("sqlite:////proc/mlflow.db")  # not minutes of MLflow's retries
        assert "\n" not in str(info.value)
    db.write_bytes(b"")
    db.chmod(0o444)
    if not os.access(db, os.W_OK):  # (root writes whatever the mode bits say)
        with pytest.raises(ValueError, match=f"{db} is not writable"):
            check_tracking_writable(f"sqlite:///{db}")


@contextlib.contextmanager
def _http_server():
    """A local HTTP server on a free port for the block (it answers 404 to everything)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Quiet(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
