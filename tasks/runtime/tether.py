"""Child processes that die with their parent: Prefect's ephemeral API server above all.

Without a Prefect server (``PREFECT_API_URL`` unset) the first flow run of a command starts a temporary
one: ``python -m uvicorn ... prefect.server.api.server:create_app`` in a child process, stopped by an
``atexit`` hook. A command killed with ``kill -9`` runs no hook, and the server lived on, one per killed
command. :func:`tether_ephemeral_server` makes Prefect start it as
``python -m octseg.tasks.runtime.tether <parent pid> -m uvicorn ...`` instead: this module's
:func:`main` watches its parent (``getppid()`` changes the moment the parent dies, whatever killed it,
and whichever of the parent's threads started the child, unlike ``PR_SET_PDEATHSIG``) and then stops
uvicorn with SIGTERM, or exits at once if it does not stop within :data:`GRACE_SECONDS`. The server also
runs in a session of its own, so a Ctrl-C at the terminal reaches the command and not the server: the
command marks its flow run crashed and exits (with the server gone first, it retried it for minutes).

Standard library only; Prefect is imported inside :func:`tether_ephemeral_server`.
"""
from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["GRACE_SECONDS", "POLL_SECONDS", "main", "tether_ephemeral_server", "tethered_command", "watch_parent"]

POLL_SECONDS = 0.2  # how often a tethered child looks at its parent
GRACE_SECONDS = 10.0  # how long it gives the program to stop after SIGTERM


def tethered_command(args: Sequence[str], parent: int | None = None) -> list[str]:
    """``[python, -m, module, ...]`` as run under this module, tethered to ``parent`` (this process)."""
    python, *rest = args
    return [python, "-m", __name__, str(os.getpid() if parent is None else parent), *rest]


def watch_parent(parent: int, poll: float = POLL_SECONDS, grace: float = GRACE_SECONDS) -> threading.Thread:
    """A daemon thread that stops this process when ``parent`` is no longer its parent."""

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down on it, as on Prefect's own stop()
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=run, name="octseg-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: Sequence[str]) -> None:
    """``<parent pid> -m <module> [args...]``: run the module as ``python -m`` would, tethered to the parent."""
    if len(argv) < 3 or argv[1] != "-m":
        raise SystemExit(f"usage: python -m {__name__} PARENT_PID -m MODULE [ARGS...]")
    parent = int(argv[0])
    if os.getppid() != parent:  # the parent died before this process got here
        raise SystemExit(1)
    watch_parent(parent)
    module = argv[2]
    sys.argv = [module, *argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class _TetheredSubprocess(types.ModuleType):
    """The ``subprocess`` module as Prefect's server module sees it: ``Popen`` of ``python -m uvicorn``
    runs tethered; everything else is the real module."""

    def __init__(self) -> None:
        super().__init__("subprocess")

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args: Any, *more: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - the name Prefect calls
        if isinstance(args, (list, tuple)) and len(args) > 2 and list(args[1:3]) == ["-m", "uvicorn"]:
            args = tethered_command(args)
            # its own session: a Ctrl-C at the terminal (SIGINT to the foreground group) stops the command,
            # which still reports its flow run as crashed, instead of the server first
            kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(args, *more, **kwargs)


def tether_ephemeral_server() -> bool:
    """Make every ephemeral Prefect server this process starts from now on die with it (see the module
    docstring); True when installed (no ``PREFECT_API_URL``, and Prefect's server module as expected),
    idempotent. Imports Prefect's server module (~1 s), which the ephemeral server's start imports anyway."""
    try:
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            return False  # a real Prefect server: no ephemeral one is started (and its module is not imported)
        from prefect.server.api import server
    except ImportError:
        return False
    if isinstance(getattr(server, "subprocess", None), _TetheredSubprocess):
        return True
    if getattr(server, "subprocess", None) is not subprocess or not hasattr(server, "SubprocessASGIServer"):
        return False  # a Prefect that starts its server differently: leave it alone
    server.subprocess = _TetheredSubprocess()
    return True


if __name__ == "__main__":
    main(sys.argv[1:])
