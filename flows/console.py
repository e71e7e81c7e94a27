"""How a command runs a flow and talks to the console: third-party logs kept quiet unless ``--verbose``,
Prefect's ephemeral server tied to the command, a flow's error as one line, and the summary with one line
per failed item (exit code 1 when any failed)."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, NoReturn

import typer

__all__ = ["QUIET_LOGGERS", "one_line", "prepare_runtime", "quiet_third_party", "report", "run_flow"]

QUIET_LOGGERS = ("distributed", "mlflow", "alembic")  # third-party INFO lines off the console by default


def one_line(error: Exception) -> str:
    """The error as one line; a pydantic ValidationError as ``field: message; ...``."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
    return " ".join(str(error).split())



class _NoTracebackFormatter(logging.Formatter):
    """Prefect's console format without exception tracebacks (the message names the error already)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not record.exc_info:
            return self.inner.format(record)
        exc_info, exc_text = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = exc_info, exc_text


def quiet_third_party(verbose: bool) -> None:
    """Third-party INFO logs off the console unless ``--verbose``: set first in every command, since
    MLflow and Dask read these when they are first imported (and Dask's workers inherit them)."""
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
        # the file libraries' complaints about a damaged file: the reader refuses it in one line of its own
        for module in ("pydicom", "tifffile", "PIL", "eyepy", "oct_converter"):
            warnings.filterwarnings("ignore", category=UserWarning, module=module)


def prepare_runtime(verbose: bool) -> None:
    """Logging for a flow run from the command line: third-party INFO logs and the tracebacks of failed
    items stay off the console unless ``--verbose``; Prefect's own logs and run records are unchanged."""
    if not verbose:  # in case Dask was imported before the variable was set (e.g. in tests)
        import dask

        from octseg.tasks.runtime.cluster import QUIET_WORKERS

        dask.config.set({"distributed.logging.distributed": "warning", QUIET_WORKERS: True})
    from octseg.tasks.runtime.tether import tether_ephemeral_server
    from prefect.logging.configuration import ensure_logging_setup

    tether_ephemeral_server()  # an ephemeral Prefect server dies with this command, even on kill -9
    ensure_logging_setup()
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and handler.formatter is not None:
            if not isinstance(handler.formatter, _NoTracebackFormatter):
                handler.setFormatter(_NoTracebackFormatter(handler.formatter))


def run_flow(flow_fn: Any, config: Any, verbose: bool) -> Any:
    """Run ``flow_fn(config)`` as a Prefect flow run and return its summary, failed or not.

    A flow that raised a ValueError (bad input found on the way) is a user error (exit 2, one line);
    any other error is one line and exit 1, with its traceback only under ``--verbose``.
    """
    prepare_runtime(verbose)
    from octseg.flows.runs import summary_of

    try:
        return summary_of(flow_fn(config, return_state=True))
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        if _during_interrupt(e):  # raised while Ctrl-C unwound the run (e.g. MLflow's store still locked by the
            _interrupted()  # write it interrupted): the interrupt, not a failure
        if verbose or isinstance(e, ValueError):
            raise
        typer.secho(f"Error: {type(e).__name__}: {one_line(e)} (--verbose shows the traceback)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None


def _interrupted() -> NoReturn:
    """The interrupt, said in one line: exit 130."""
    typer.secho("Interrupted: stopped (its flow run, if one had started, is marked crashed). What finished is "
                "kept: the same command skips it, and training continues from its last checkpoint",
                fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(code=130) from None


def _during_interrupt(error: BaseException) -> bool:
    """True when ``error`` was raised while a KeyboardInterrupt was being handled (its context chain holds one)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def report(summary: Any) -> None:
    """The summary, one line per failed item, and exit code 1 when any failed."""
    failures = list(getattr(summary, "failures", []))
    typer.secho(summary.headline(), fg=typer.colors.GREEN if not failures else typer.colors.YELLOW)
    for w in getattr(summary, "warnings", []):
        typer.secho(f"  warning: {w}", fg=typer.colors.YELLOW, err=True)
    for f in failures:
        typer.secho(f"  failed: {f}", fg=typer.colors.RED, err=True)
    if failures:
        raise typer.Exit(code=1)
