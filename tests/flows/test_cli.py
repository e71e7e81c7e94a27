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
from typer.testing import CliRunner

from octseg.flows.cli import app
from octseg.tasks.archive import open_archive
from octseg.tasks.phantom import write_phantom_files

ROOT = Path(__file__).resolve().parents[2]
PHANTOMS = ["phantom_000", "phantom_001"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module", autouse=True)
def prefect_logging_outside_the_runner() -> None:
    """Prefect binds its console handler to the ``sys.stderr`` of the moment it first sets up logging;
    done inside ``CliRunner.invoke`` that is the runner's stream, closed after the call, and every later
    log line prints a '--- Logging error ---' traceback into the next command's output."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


def _invoke(*args: str):
    """Run ``octseg ARGS`` in-process on a wide terminal (help panels unwrapped)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    result.plain = _ANSI.sub("", result.output)  # output = stdout and stderr interleaved
    return result


@pytest.mark.parametrize(("command", "options"), [
    ((), ["ingest", "preprocess", "train", "segment", "pipeline", "demo"]),
    (("ingest",), ["sources", "--archive", "--labels"]),
    (("preprocess",), ["--archive", "--volume", "--dask-address", "--workers", "--w0", "--sigma"]),
    (("train",), ["--archive", "--epochs", "--base-channels", "--depth", "--batch-size", "--lr", "--optimizer",
                  "--tiles-per-epoch", "--device", "--tracking-uri"]),
    (("segment",), ["--archive", "--model", "models:/octseg-unet@champion", "--tracking-uri", "--qc-dir", "--force"]),
    (("pipeline",), ["sources", "--archive", "--labels", "--epochs", "--base-channels", "--tracking-uri",
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
    from octseg.tasks.tracking import ensure_experiment

    archive = ingested["archive"]
    db = tmp_path / "empty.db"
    if make_db:
        ensure_experiment(f"sqlite:///{db}")
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
    (("ingest", "missing.tif", "--archive", "{tmp}/a.zarr"), "source(s) not found: missing.tif"),  # before any flow
    (("preprocess", "--archive", "{tmp}/none.zarr"), "no archive here"),  # the flow raises ArchiveError
])
def test_user_errors_are_one_line_with_exit_code_2(args: tuple[str, ...], phrase: str, tmp_path: Path) -> None:
    result = _invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr and "Traceback" not in result.output
    assert [x for x in result.stderr.splitlines() if x.startswith("Error:")] == [result.stderr.strip()]
    assert not any(tmp_path.iterdir())  # nothing created


def test_pipeline_on_tiny_phantoms(tmp_path: Path) -> None:
    sources = write_phantom_files(tmp_path / "scans", n_volumes=2, n_bscans=4, height=64, width=96)
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
