"""The ``octseg`` command in-process (``typer.testing.CliRunner``), so the session's Prefect harness
applies: help texts, a light import, ingest with a bad file, clean errors, and the whole pipeline on
tiny phantoms with a real Dask LocalCluster, Zarr under tmp_path and MLflow in SQLite."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from octseg.tasks.archive.store import open_archive
from tests.flows.cli_runner import invoke as _invoke
from octseg.tasks.synthetic.phantom import write_phantom_files

ROOT = Path(__file__).resolve().parents[2]
PHANTOMS = ["phantom_000", "phantom_001"]


@pytest.mark.parametrize(("command", "options"), [
    ((), ["ingest", "preprocess", "train", "segment", "evaluate", "pipeline", "demo"]),
    (("evaluate",), ["--archive", "--model", "--volume", "--fix", "--tile-size", "--overlap", "--tracking-uri",
                     "--config", "--show-config"]),
    (("ingest",), ["SOURCE", "--archive", "--labels", "--keep-identifiers", "--grader", "--dicom-secondary-capture",
                   "--max-voxels",
                   "--dask-address", ".vol", "DICOM", "--config", "--show-config", "--verbose"]),
    (("preprocess",), ["--archive", "--volume", "--dask-address", "--workers", "--w0", "--sigma", "--balanced",
                       "[default: (10.0)]", "--config", "--show-config"]),
    (("train",), ["--archive", "--epochs", "--base-channels", "--depth", "--batch-size", "--lr", "--optimizer",
                  "--tiles-per-epoch", "--device", "--tracking-uri", "--classes", "--weight-decay", "--amp",
                  "--up-mode", "--padding", "--batch-norm", "--momentum", "--tile-size", "--max-tile", "--config",
                  "--show-config", "--verbose", "[default: (64)]", "[default: (572)]"]),
    (("segment",), ["--archive", "--model", "models:/octseg-unet@champion", "--tracking-uri", "--qc-dir", "--force",
                    "--tile-size", "--overlap", "--batch-size", "[default: (0.25)]", "--config", "--show-config"]),
    (("pipeline",), ["SOURCE", "--archive", "--labels", "--epochs", "--base-channels", "--tracking-uri",
                     "--dask-address"]),
    (("demo",), ["--workdir", "--epochs", "--volumes"]),
])
def test_help_names_the_key_options(command: tuple[str, ...], options: list[str]) -> None:
    result = _invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.plain, (command, option)


def test_help_imports_no_heavy_module() -> None:
    """``octseg --help`` must not pay for torch, mlflow or prefect (seconds each on a small machine)."""
    code = (
        "import sys\n"
        "from octseg.flows.cli import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = ('torch', 'mlflow', 'prefect', 'dask', 'zarr')\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout[-500:]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> dict:
    """Two phantom volumes with masks plus an empty ``broken.tif``, ingested once by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    scans = root / "scans"
    good = write_phantom_files(scans, n_volumes=2, n_bscans=4, height=64, width=96)
    broken = scans / "broken.tif"
    broken.write_bytes(b"")
    archive = root / "archive.zarr"
    first = _invoke("ingest", *map(str, good), str(broken), "--labels", str(scans / "labels"), "--archive", str(archive))
    return {"root": root, "good": good, "labels": scans / "labels", "archive": archive, "first": first}


def test_ingest_reports_the_bad_file_and_lands_the_good_ones(ingested) -> None:
    result = ingested["first"]
    assert result.exit_code == 1, result.output
    assert "2 written, 0 up to date, 1 failed" in result.plain
    assert re.search(r"failed: .*broken\.tif: empty file", result.plain), result.plain
    archive = open_archive(ingested["archive"], create=False)
    assert archive.volume_ids() == PHANTOMS
    assert all(archive.manual_labels(v) is not None for v in PHANTOMS)


def test_ingest_rerun_of_good_files_is_up_to_date(ingested) -> None:
    result = _invoke("ingest", *map(str, ingested["good"]), "--labels", str(ingested["labels"]),
                     "--archive", str(ingested["archive"]))
    assert result.exit_code == 0, result.output
    assert "0 written, 2 up to date, 0 failed" in result.plain


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and modification time (ns)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("make_db, phrase", [
    (False, "no MLflow database at"),  # a typo in the URI must not create an empty database
    (True, "no registered model 'octseg-unet'"),  # a database without the model
])
def test_segment_without_a_registered_model_fails_cleanly(ingested, tmp_path: Path, make_db: bool, phrase: str) -> None:
    from octseg.tasks.tracking.uri import ensure_experiment

    archive = ingested["archive"]
    db = tmp_path / "empty.db"
    if make_db:
        ensure_experiment(f"sqlite:///{db}", "octseg")
    before = _tree(archive.parent)
    result = _invoke("segment", "--archive", str(archive), "--tracking-uri", f"sqlite:///{db}")
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert phrase in line and "octseg train" in line
    assert "Traceback" not in result.output
    assert db.exists() == make_db
    assert _tree(archive.parent) == before  # no prediction, no QC folder, no staging left
    assert all(open_archive(archive, create=False).prediction_info(v) is None for v in PHANTOMS)


@pytest.mark.parametrize(("args", "phrase"), [
    (("preprocess", "--archive", "{tmp}/none.zarr"), "no archive here"),
    (("train", "--archive", "{tmp}/none.zarr", "--depth", "0"), "unet.depth: Input should be greater than or equal to 1"),
    (("train", "--archive", "{tmp}/none.zarr", "--optimizer", "rmsprop"), "train.optimizer: Input should be"),
    (("segment", "--archive", "{tmp}/none.zarr", "--overlap", "1.5"), "inference.overlap: Input should be less than 1"),
    (("train", "--archive", "{tmp}/a.zarr", "--config", "{tmp}/missing.yaml"), "missing.yaml: cannot be read"),
])
def test_user_errors_are_one_line_with_exit_code_2(args: tuple[str, ...], phrase: str, tmp_path: Path) -> None:
    result = _invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr and "Traceback" not in result.output
    assert [x for x in result.stderr.splitlines() if x.startswith("Error:")] == [result.stderr.strip()]
    assert not any(tmp_path.iterdir())  # nothing created


def _user_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    return line


def test_paths_that_cannot_work_are_refused_before_any_flow(ingested, tmp_path: Path) -> None:
    """Each found tried as a new user would: a one-line error, and the archive is left as it was."""
    archive = str(ingested["archive"])
    regular = tmp_path / "notes.txt"
    regular.write_text("not a database, not a folder")
    before = _tree(ingested["archive"].parent)
    cases = {
        "is not a SQLite database": ("train", "--archive", archive, "--tracking-uri", f"sqlite:///{regular}"),
        "notes.txt is a file, not a folder": ("ingest", *map(str, ingested["good"]), "--archive",
                                              str(regular / "archive.zarr")),
        "--labels " + str(tmp_path / "labelz") + ": no such folder": (
            "ingest", *map(str, ingested["good"]), "--labels", str(tmp_path / "labelz"), "--archive", archive),
        "notes.txt: is a file, not a folder": ("ingest", *map(str, ingested["good"]), "--labels", str(regular),
                                               "--archive", archive),
        "QC folder": ("segment", "--archive", archive, "--qc-dir", str(regular),
                      "--tracking-uri", f"sqlite:///{tmp_path / 'any.db'}"),
    }
    for phrase, args in cases.items():
        assert phrase in _user_error(_invoke(*args)), args
    assert _tree(ingested["archive"].parent) == before


def test_an_archive_nobody_can_write_is_refused() -> None:
    """A real probe (root ignores mode bits, so the test needs a folder that refuses even root)."""
    from octseg.flows.preflight import check_writable

    folder = Path("/sys")
    if not folder.is_dir() or os.access(folder, os.W_OK) and os.geteuid() != 0:
        pytest.skip("no folder here that refuses writes")
    with pytest.raises(ValueError, match="archive /sys is not writable"):
        check_writable(folder, "archive")


def test_config_file_then_options_then_show_config(tmp_path: Path) -> None:
    """--config fills the flow's config, options override it, --show-config prints it (YAML) and stops."""
    import yaml

    from octseg.flows.config import TrainFlowConfig

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({"archive": "x.zarr", "unet": {"base_channels": 16, "depth": 3},
                                        "train": {"epochs": 5, "optimizer": "adam", "lr": 0.001}}))
    result = _invoke("train", "--config", str(cfg_file), "--epochs", "7", "--weight-decay", "0.0001", "--classes",
                     "3", "--no-augment", "--show-config")
    assert result.exit_code == 0, result.output
    shown = TrainFlowConfig.model_validate(yaml.safe_load(result.stdout))
    assert (shown.unet.base_channels, shown.unet.depth, shown.unet.out_channels) == (16, 3, 3)
    assert (shown.train.epochs, shown.train.optimizer, shown.train.lr) == (7, "adam", 0.001)
    assert shown.train.weight_decay == 0.0001 and shown.train.augment is False
    assert shown.train.momentum == 0.99  # untouched settings keep the one default
    assert not (tmp_path / "x.zarr").exists()  # nothing ran
    bad = tmp_path / "bad.json"
    bad.write_text('{"archive": "x.zarr", "unet": {"base_chanels": 8}}')
    assert f"config file {bad}: unet.base_chanels: Unexpected keyword argument" in _user_error(
        _invoke("train", "--config", str(bad)))
    bad.write_text('{"archive": "x.zarr", "train": {"epochs": "many"}}')  # named by the file, unless an option set it
    assert f"config file {bad}: train.epochs: Input should be a valid integer" in _user_error(
        _invoke("train", "--config", str(bad)))
    assert _invoke("train", "--config", str(bad), "--epochs", "3", "--show-config").exit_code == 0
    assert "config file" not in _user_error(_invoke("train", "--config", str(bad), "--epochs", "0"))
    for name, text in (("twice.yaml", "train:\n  epochs: 1\n  epochs: 5\n"),  # a key twice: refused, not the last
                       ("twice.json", '{"train": {"epochs": 1, "epochs": 5}}')):
        (tmp_path / name).write_text(text)
        assert "given twice" in _user_error(_invoke("train", "--config", str(tmp_path / name), "--show-config"))
    merged = tmp_path / "merged.yaml"  # YAML's anchors and merge keys still work, a merged key may be overridden
    merged.write_text("base: &base {epochs: 3, lr: 0.002}\ntrain:\n  <<: *base\n  epochs: 4\n")
    from octseg.flows.config import load_config_file

    assert load_config_file(merged)["train"] == {"epochs": 4, "lr": 0.002}


def test_segment_options_reach_the_inference_config(tmp_path: Path) -> None:
    import yaml

    result = _invoke("segment", "--archive", "a.zarr", "--tile-size", "188", "--overlap", "0.5", "--batch-size", "2",
                     "--amp", "--show-config")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)["inference"]
    assert (shown["tile_size"], shown["overlap"], shown["batch_size"], shown["amp"]) == (188, 0.5, 2, True)


def test_pipeline_on_tiny_phantoms(tmp_path: Path) -> None:
    *sources, unseen = write_phantom_files(tmp_path / "scans", n_volumes=3, n_bscans=4, height=64, width=96)
    archive = tmp_path / "archive.zarr"
    result = _invoke(
        "pipeline", *map(str, sources), "--labels", str(tmp_path / "scans" / "labels"), "--archive", str(archive),
        "--epochs", "1", "--base-channels", "4", "--depth", "2", "--optimizer", "adam", "--lr", "0.001",
        "--tiles-per-epoch", "4", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert result.exit_code == 0, result.output
    lines = [x for x in result.stdout.splitlines() if x.split(":")[0] in ("ingest", "preprocess", "train", "segment")]
    assert [x.split(":")[0] for x in lines] == ["ingest", "preprocess", "train", "segment"], result.stdout
    assert "2 written" in lines[0] and "2 volumes computed" in lines[1]
    assert "octseg-unet v1" in lines[2] and "2 segmented" in lines[3]
    arc = open_archive(archive, create=False)
    assert all(arc.prediction(v).shape == (4, 64, 96) for v in PHANTOMS)
    # nothing left to do: each command answers without a Prefect server (an unreachable API proves it)
    offline = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "OCTSEG_PROGRESS": "0"}
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    train = ["--epochs", "1", "--base-channels", "4", "--depth", "2", "--optimizer", "adam", "--lr", "0.001",
             "--tiles-per-epoch", "4"]
    for args, phrase in [
        (["ingest", *map(str, sources), "--labels", str(tmp_path / "scans" / "labels")], "0 written, 2 up to date"),
        (["preprocess"], "0 volumes computed, 2 up to date"),
        (["train", *train, *tracking], "already trained as octseg-unet v1"),
        (["segment", *tracking], "0 segmented, 2 already done"),
    ]:
        done = subprocess.run([sys.executable, "-m", "octseg.flows.cli", *args, "--archive", str(archive)],
                              capture_output=True, text=True, timeout=300, env=offline, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stdout, done.stderr[-2000:])
        assert phrase in done.stdout, (args, done.stdout)
    missing = subprocess.run([sys.executable, "-m", "octseg.flows.cli", "evaluate", "--volume", "nope", *tracking,
                              "--archive", str(archive)], capture_output=True, text=True, timeout=300, env=offline,
                             cwd=tmp_path)  # a volume the archive lacks: refused before any flow run (no server)
    assert missing.returncode == 2 and "['nope'] not in archive" in missing.stdout + missing.stderr, missing.stderr
    evaluate = ("evaluate", "--archive", str(archive), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    refused = _invoke(*evaluate)  # both annotated volumes trained the model: nothing scores it on unseen scans
    assert refused.exit_code == 2 and "none scores it on unseen scans" in refused.plain, refused.output
    assert _invoke("ingest", str(unseen), "--labels", str(tmp_path / "scans" / "labels"), "--archive",
                   str(archive)).exit_code == 0
    held_out = _invoke(*evaluate)  # by default: the annotated volumes that did not train it
    assert held_out.exit_code == 0, held_out.output
    assert "on 1 volumes" in held_out.plain and "phantom_002" in held_out.plain and "NOT HELD OUT" not in held_out.plain
    from mlflow import MlflowClient

    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version("octseg-unet", "1").tags
    assert "octseg.eval_score" in tags  # a held-out score is recorded on the version
    evaluated = _invoke(*evaluate, "--fix", "--volume", "phantom_001")  # named: scored, and said to be no held-out score
    assert evaluated.exit_code == 0, evaluated.output
    assert "evaluate: octseg-unet v1 on 1 volumes" in evaluated.plain and "pooled Dice" in evaluated.plain
    assert "NOT HELD OUT: phantom_001" in evaluated.plain
    assert open_archive(archive, create=False).evaluation_set() == ["phantom_001"]


def test_first_command_on_a_fresh_machine_works_and_is_quiet(tmp_path: Path) -> None:
    """An empty PREFECT_HOME and no start-up timeout set: the ephemeral server's first start (database
    migrations) must not time out; Dask's INFO lines stay off the console."""
    sources = write_phantom_files(tmp_path / "scans", n_volumes=1, n_bscans=2, height=32, width=48)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_"))}
    env.update(PREFECT_HOME=str(tmp_path / "fresh-prefect-home"), OCTSEG_PROGRESS="0")
    archive = str(tmp_path / "a.zarr")
    for args in (["ingest", *map(str, sources), "--archive", archive], ["preprocess", "--archive", archive]):
        done = subprocess.run([sys.executable, "-m", "octseg.flows.cli", *args], capture_output=True, text=True,
                              timeout=400, env=env, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr[-3000:])
        assert "Traceback" not in done.stderr and "Timed out" not in done.stderr
        assert not [x for x in done.stderr.splitlines() if "distributed." in x and "INFO" in x], done.stderr[-3000:]


def test_prefect_reads_the_commands_start_up_timeout() -> None:
    """The setting is in place before any command can import Prefect (which reads settings once)."""
    code = ("import octseg.flows.cli, octseg.flows.ingest\n"
            "from prefect.settings import get_current_settings\n"
            "print('TIMEOUT', get_current_settings().server.ephemeral.startup_timeout_seconds)\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TIMEOUT 120" in done.stdout


def test_an_unexpected_flow_error_is_one_line_and_exit_1(capsys) -> None:
    """Not a user error (exit 2) and not a traceback: one line naming the error; --verbose re-raises."""
    import typer
    from prefect import flow

    from octseg.flows import cli

    @flow(name="octseg-test-boom")
    def boom(config: int) -> None:
        raise RuntimeError(f"disk {config} on fire")

    with pytest.raises(typer.Exit) as exit_info:
        cli.run_flow(boom, 7, verbose=False)
    assert exit_info.value.exit_code == 1
    err = capsys.readouterr().err
    assert "Error: RuntimeError: disk 7 on fire" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="disk 8 on fire"):
        cli.run_flow(boom, 8, verbose=True)


def test_an_error_raised_while_ctrl_c_unwinds_is_the_interrupt(capsys) -> None:
    """Ctrl-C in the middle of an MLflow write left the store locked, and the run's clean-up failed on it: the
    command said "Error: MlflowException: database is locked" and exited 1. It is the interrupt: exit 130."""
    import typer
    from prefect import flow

    from octseg.flows import cli

    @flow(name="octseg-test-interrupted")
    def interrupted(config: int) -> None:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError(f"database {config} is locked")

    with pytest.raises(typer.Exit) as exit_info:
        cli.run_flow(interrupted, 7, verbose=False)
    assert exit_info.value.exit_code == 130
    assert "Interrupted:" in capsys.readouterr().err


def test_a_duplicate_id_fails_even_when_everything_else_is_up_to_date(ingested) -> None:
    good = ingested["good"][0]
    twin = good.parent / "twin" / good.name
    twin.parent.mkdir(exist_ok=True)
    twin.write_bytes(good.read_bytes())
    result = _invoke("ingest", str(good), str(twin), "--archive", str(ingested["archive"]))
    assert result.exit_code == 1, result.output
    assert "1 up to date, 1 failed" in result.plain and "is already used by" in result.plain


def test_one_file_named_several_ways_is_ingested_once(ingested, tmp_path: Path, monkeypatch) -> None:
    good = ingested["good"][0]
    monkeypatch.chdir(good.parent)
    listed = tmp_path / "sources.txt"
    listed.write_text(f"{good}\n")
    archive = tmp_path / "once.zarr"
    result = _invoke("ingest", good.name, f"./{good.name}", str(good), "--sources-file", str(listed),
                     "--archive", str(archive))
    assert result.exit_code == 0, result.output
    assert "1 written, 0 up to date, 0 failed" in result.plain


def test_train_with_two_processes_logs_every_epoch_to_one_mlflow_run(ingested, tmp_path: Path) -> None:
    """``--gpus/--processes 2`` on CPU: two gloo DDP processes train; the command's own process keeps the
    MLflow run (per-epoch metrics, checkpoint) and registers the weights."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _invoke("train", "--archive", str(ingested["archive"]), "--tracking-uri", uri, "--processes", "2",
                     "--epochs", "2", "--batch-size", "2", "--tiles-per-epoch", "4", "--base-channels", "4",
                     "--depth", "2", "--optimizer", "adam", "--lr", "0.001", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "octseg-unet v1" in result.plain
    client = MlflowClient(uri)
    version = client.get_model_version("octseg-unet", "1")
    run = client.get_run(version.run_id)
    assert run.data.params["train.processes"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    assert "checkpoint" in [a.path for a in client.list_artifacts(run.info.run_id)]
