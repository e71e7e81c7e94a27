"""The command's face stays put: every option of every command (its flags, short forms, help sentence, shown
default, panel and type: ``golden/options.json``) and ``--show-config`` of every config match the files in
``golden/`` (written from the command itself; regenerate them with ``python tests/flows/test_help_golden.py``
after a deliberate change and read the diff). The order of options within ``--help`` may change."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script to regenerate
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.flows.cli_runner import invoke  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
COMMANDS = ["ingest", "preprocess", "train", "segment", "evaluate", "pipeline", "watch", "catalogue", "demo"]
SHOW = {  # command -> the smallest arguments that make a valid config
    "ingest": ["ingest", "a.tif", "b.vol", "--archive", "x.zarr"],
    "preprocess": ["preprocess", "--archive", "x.zarr"],
    "train": ["train", "--archive", "x.zarr"],
    "segment": ["segment", "--archive", "x.zarr"],
    "evaluate": ["evaluate", "--archive", "x.zarr"],
    "pipeline": ["pipeline", "a.tif", "--archive", "x.zarr"],
    "watch": ["watch", "--inbox", "in", "--archive", "x.zarr"],
    "catalogue": ["catalogue", "--archive", "x.zarr"],
}


def _param(p) -> dict:
    """What a user sees of one option or argument, independent of its position and Python name."""
    return {"kind": type(p).__name__, "opts": p.opts, "secondary_opts": p.secondary_opts,
            "help": getattr(p, "help", None), "show_default": getattr(p, "show_default", None),
            "panel": getattr(p, "rich_help_panel", None), "metavar": p.metavar,
            "type": repr(p.type_descriptor.annotation), "multiple": p.multiple, "flag": getattr(p, "is_flag", False),
            "required": p.required, "default": repr(p.default)}


def options() -> str:
    import json

    import typer

    from octseg.flows.cli import app

    group = typer.main.get_command(app)
    out = {"octseg": {"help": group.help}}
    for name in COMMANDS:
        cmd = group.commands[name]
        params = sorted((_param(p) for p in cmd.params), key=lambda d: (str(d["panel"]), d["opts"]))
        out[name] = {"help": cmd.help, "params": params}
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


def _outputs() -> dict[str, str]:
    out = {"options.json": options()}
    out.update({f"show-{c}.yaml": invoke(*args, "--show-config").plain for c, args in SHOW.items()})
    return out


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    import os

    saved = os.environ.pop("DASK_SCHEDULER_ADDRESS", None)  # a default read from the environment
    try:
        return _outputs()
    finally:
        if saved is not None:
            os.environ["DASK_SCHEDULER_ADDRESS"] = saved


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.iterdir()))
def test_matches_golden(outputs: dict[str, str], name: str) -> None:
    assert name in outputs, f"golden/{name} names no command output"
    assert outputs[name] == (GOLDEN / name).read_text(), f"{name} changed; regenerate and review the diff"


def test_every_command_has_a_golden(outputs: dict[str, str]) -> None:
    assert sorted(outputs) == sorted(p.name for p in GOLDEN.iterdir())


if __name__ == "__main__":  # regenerate: python tests/flows/test_help_golden.py
    for name, text in _outputs().items():
        (GOLDEN / name).write_text(text)
