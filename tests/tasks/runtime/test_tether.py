"""No orphaned servers: a child started through :mod:`octseg.tasks.runtime.tether` dies with its parent, and
an ``octseg`` command killed with ``kill -9`` while Prefect's ephemeral server starts leaves nothing running."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None when there is none (a zombie counts as none)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]), int(fields[19]))


def _children(pid: int, word: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[1] == pid:
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if word in cmdline:
                found.append(int(entry.name))
    return found


def _wait_gone(pid: int, started: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        st = _stat(pid)
        if st is None or st[2] != started:  # gone (or its pid reused by another process)
            return True
        time.sleep(0.1)
    return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_tethered_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent that starts ``python -m http.server`` tethered, then is killed with SIGKILL."""
    parent_code = textwrap.dedent("""
        import subprocess, sys, time
        from octseg.tasks.runtime.tether import tethered_command
        child = subprocess.Popen(tethered_command([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the child runs its module
        st = _stat(child)
        assert st is not None and st[1] == parent.pid
        parent.kill()
        parent.wait()
        assert _wait_gone(child, st[2], 10), "the tethered child outlived its parent"
    finally:
        _kill(child)
        parent.kill()


def test_kill_9_of_a_command_during_start_up_leaves_no_prefect_server(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.zeros((2, 16, 16), np.uint8))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}  # no server: an ephemeral one
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    command = [sys.executable, "-c", "from octseg.flows.cli import main; main()", "ingest", str(tmp_path / "v.npy"),
               "--archive", str(tmp_path / "a.zarr")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not servers and time.monotonic() < deadline and proc.poll() is None:
            servers = _children(proc.pid, "uvicorn")
            time.sleep(0.05)
        assert servers, f"no ephemeral server started (command exited {proc.returncode})"
        started = {pid: st[2] for pid in servers if (st := _stat(pid))}
        os.kill(proc.pid, signal.SIGKILL)  # while the server starts: no atexit hook runs
        proc.wait()
        left = [pid for pid, t in started.items() if not _wait_gone(pid, t, 20)]
        assert not left, f"ephemeral Prefect server(s) {left} outlived the killed command"
    finally:
        proc.kill()
        for pid in servers:
            _kill(pid)


def test_ctrl_c_stops_a_command_at_once_and_its_flow_run_is_marked_crashed(tmp_path: Path, prefect_home) -> None:
    """SIGINT to the command's whole process group, as a terminal sends it: the ephemeral server runs in its
    own session, so it is still there to hear that the run crashed (it used to die first, and the command
    retried it for minutes); the command says it was interrupted and exits 130."""
    from octseg.tasks.archive.store import open_archive

    archive = open_archive(tmp_path / "a.zarr")
    rng = np.random.default_rng(0)
    for vid in ("v0", "v1"):
        archive.write_volume(vid, rng.integers(0, 255, (2, 48, 48), dtype=np.uint8), annotated=[0, 1],
                             manual_labels=(rng.random((2, 48, 48)) > 0.7).astype(np.uint8),
                             provenance={"source": f"{vid}.npy", "source_sha256": vid[1] * 64, "reader": "npy"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}  # an ephemeral server
    env.update(PREFECT_HOME=str(prefect_home(tmp_path / "prefect")), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", OCTSEG_PROGRESS="0")
    log = tmp_path / "out.txt"
    command = [sys.executable, "-c", "from octseg.flows.cli import main; main()", "train", "--archive",
               str(tmp_path / "a.zarr"), "--epochs", "100000", "--base-channels", "4", "--depth", "2",
               "--tiles-per-epoch", "2", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    with log.open("w") as out:  # a group of its own (as a terminal job), SIGINT handled as by default
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while "epoch 2:" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            servers = servers or _children(proc.pid, "uvicorn")
            time.sleep(0.2)
        assert "epoch 2:" in log.read_text(), log.read_text()[-3000:]
        assert servers and all(os.getsid(pid) != os.getsid(proc.pid) for pid in servers)  # a session of its own
        started = {pid: st[2] for pid in servers if (st := _stat(pid))}
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 130, log.read_text()[-3000:]
        text = log.read_text()
        assert "Interrupted:" in text and "Crashed" in text and "Error logging to API" not in text, text[-3000:]
        assert all(_wait_gone(pid, t, 20) for pid, t in started.items()), "the ephemeral server outlived the command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in servers:
            _kill(pid)
