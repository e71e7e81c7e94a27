"""Run ``octseg`` in-process for the command-line tests, on a wide terminal, with ANSI codes stripped."""
from __future__ import annotations

import re

from typer.testing import CliRunner

from octseg.flows.cli import app

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def invoke(*args: str):
    """``octseg ARGS``; ``result.plain`` is the output (stdout and stderr interleaved) without colour codes."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    result.plain = _ANSI.sub("", result.output)
    return result
