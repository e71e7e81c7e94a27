"""Misconfiguration is answered in seconds, in one line, exit code 2, before any flow starts (issue 17,
item 4): a tracking server that is not listening, a tracking scheme MLflow does not know, an empty or
foreign file given as the tracking database, and an archive whose sibling folders cannot be made. And the
hostile files of items 1 and 2 through the command: a per-page TIFF is every B-scan, a truncated one and a
CT DICOM are refused, secondary capture only with --dicom-secondary-capture."""
from __future__ import annotations

import ast
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from octseg.tasks.archive.store import open_archive
from tests.flows.cli_runner import invoke as _invoke
from tests.tasks.readers import vendor_files as vf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ")
    return line


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "a.zarr"
    open_archive(path, create=True)
    return path


@pytest.mark.parametrize("command", ["train", "segment", "evaluate"])
def test_a_tracking_server_that_is_not_listening_is_one_line_in_seconds(archive: Path, command: str) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    line = _one_line_exit_2(_invoke(command, "--archive", str(archive), "--tracking-uri", uri))
    assert time.monotonic() - start < 10
    assert uri in line and "no server answers" in line


def test_a_tracking_server_that_accepts_but_never_answers_is_one_line_in_seconds(archive: Path) -> None:
    with socket.socket() as silent:  # connections are accepted by the kernel, nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        line = _one_line_exit_2(_invoke("train", "--archive", str(archive), "--tracking-uri", uri))
        assert time.monotonic() - start < 10
    assert "no server answers" in line or "no answer within" in line


def test_a_tracking_host_that_does_not_resolve_is_one_line(archive: Path) -> None:
    line = _one_line_exit_2(_invoke("train", "--archive", str(archive), "--tracking-uri", "http://no-such-host.invalid:5000"))
    assert "no server answers" in line


@pytest.mark.parametrize("uri", ["foo://bar", "s3://bucket/mlflow", "ftp://host/x"])
def test_an_unsupported_tracking_scheme_is_one_line(archive: Path, uri: str) -> None:
    line = _one_line_exit_2(_invoke("train", "--archive", str(archive), "--tracking-uri", uri))
    assert f"unsupported scheme {uri.split(':')[0]!r}" in line


def test_an_empty_file_is_not_a_tracking_database(archive: Path, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    os.utime(db, (time.time() - 60, time.time() - 60))  # not one another command is creating right now
    for command in ("train", "segment"):
        line = _one_line_exit_2(_invoke(command, "--archive", str(archive), "--tracking-uri", f"sqlite:///{db}"))
        assert "is an empty file, not an MLflow database" in line
    assert db.stat().st_size == 0  # never turned into a database


def test_a_foreign_sqlite_database_is_not_mlflows(archive: Path, tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE patients (id INTEGER)")
    line = _one_line_exit_2(_invoke("train", "--archive", str(archive), "--tracking-uri", f"sqlite:///{db}"))
    assert "is a SQLite database but not MLflow's (tables: patients)" in line


def test_mlflow_http_retries_are_cut_to_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that dies after the probe: the command's MLflow settings fail the next call in seconds."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    code = f"import os, octseg.flows.cli; print([os.environ[n] for n in {names!r}])"
    env = {k: v for k, v in os.environ.items() if k not in names}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    values = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert values == ["2", "1", "60"]  # set by the command when it is loaded, before MLflow is imported
    for name, value in zip(names, values):
        monkeypatch.setenv(name, value)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    start = time.monotonic()
    with pytest.raises(MlflowException):
        MlflowClient(tracking_uri=f"http://127.0.0.1:{_free_port()}").search_experiments()
    assert time.monotonic() - start < 20  # MLflow's defaults: 7 retries, backoff factor 2 (minutes)


@pytest.mark.parametrize(("sibling", "command"), [
    (".a.zarr.claims", "ingest"), (".a.zarr.staging", "ingest"), (".a.zarr.staging", "preprocess"),
    ("a.zarr.reports", "segment"), (".a.zarr.claims", "segment"),
])
def test_an_archive_whose_sibling_folders_cannot_be_made_is_refused_before_the_flow(
        archive: Path, tmp_path: Path, sibling: str, command: str) -> None:
    (tmp_path / sibling).write_text("in the way")
    np.save(tmp_path / "v.npy", np.zeros((2, 8, 8), np.uint8))
    args = {"ingest": ("ingest", str(tmp_path / "v.npy")), "preprocess": ("preprocess",),
            "segment": ("segment", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")}[command]
    start = time.monotonic()
    line = _one_line_exit_2(_invoke(*args, "--archive", str(archive)))
    assert time.monotonic() - start < 5
    assert f"{tmp_path / sibling} is a file, not a folder" in line
    assert open_archive(archive, create=False).volume_ids() == []


# ---- hostile files through the command (items 1 and 2) -----------------------------------------------------

def test_multi_page_tiffs_and_dicom_through_the_command(tmp_path: Path) -> None:
    stack = (np.random.default_rng(5).random((6, 24, 32)) * 250).astype(np.uint8)
    scans = tmp_path / "scans"
    scans.mkdir()
    with tifffile.TiffWriter(scans / "per_page.tif") as tif:
        for bscan in stack:
            tif.write(bscan, photometric="minisblack")
    tifffile.imwrite(scans / "stack.tif", stack, photometric="minisblack")
    data = (scans / "stack.tif").read_bytes()
    (scans / "cut.tif").write_bytes(data[: len(data) * 3 // 4])
    vf.write_opt_dicom(scans / "opt.dcm", stack[:3])
    vf.write_opt_dicom(scans / "ct.dcm", stack[:3], sop_class="1.2.840.10008.5.1.4.1.1.2", Modality="CT")
    vf.write_opt_dicom(scans / "sc.dcm", stack[:4], sop_class="1.2.840.10008.5.1.4.1.1.7.2", Modality="OT")
    archive = tmp_path / "a.zarr"
    names = ["per_page.tif", "stack.tif", "cut.tif", "opt.dcm", "ct.dcm", "sc.dcm"]
    result = _invoke("ingest", *(str(scans / n) for n in names), "--archive", str(archive), "--keep-identifiers")
    assert result.exit_code == 1, result.output
    assert "3 written, 0 up to date, 3 failed" in result.plain, result.plain
    failed = [x for x in result.plain.splitlines() if "failed:" in x]
    assert any("cut.tif: truncated TIFF" in x for x in failed), failed
    assert any("ct.dcm: not OCT: Modality CT, SOP class CT Image Storage" in x for x in failed), failed
    assert any("sc.dcm: not read: " in x and "--dicom-secondary-capture" in x for x in failed), failed
    stored = open_archive(archive, create=False)
    assert stored.volume_ids() == ["opt", "per_page", "stack"]
    np.testing.assert_array_equal(np.asarray(stored.image("per_page")), stack)  # 6 B-scans, not 1
    np.testing.assert_array_equal(np.asarray(stored.image("stack")), stack)
    again = _invoke("ingest", str(scans / "sc.dcm"), "--archive", str(archive), "--keep-identifiers",
                    "--dicom-secondary-capture")
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(np.asarray(open_archive(archive, create=False).image("sc")), stack[:4])
