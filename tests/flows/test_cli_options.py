"""Options derived from the config declarations: a new setting is one field, and it reaches the command."""
from __future__ import annotations

import re
from typing import Annotated

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass
from typer.testing import CliRunner

from octseg.flows.cli_options import config_command, option_specs
from octseg.flows.config import Archive, EvaluateConfig, SegmentConfig, TrainFlowConfig
from octseg.unet.config import Cli, InferenceConfig, TrainConfig, UNetConfig, affects_result, fingerprint_settings

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ToyLoss:
    """A nested settings object as a newcomer would add one."""

    rate: float = Field(0.5, gt=0, description="How fast the toy learns.")
    focal: Annotated[bool, Cli("--focal/--plain")] = Field(False, strict=True, description="Focal instead of plain.")


class ToyFlowConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    archive: Archive
    loss: ToyLoss = ToyLoss()


def _toy_app() -> typer.Typer:
    app = typer.Typer()
    seen = []

    @config_command(app, ToyFlowConfig, ["*", "loss.*"])
    def fit(cfg: ToyFlowConfig, verbose: bool) -> None:
        """Fit the toy."""
        seen.append(cfg)
        typer.echo(f"rate={cfg.loss.rate} focal={cfg.loss.focal}")

    @app.callback()
    def main() -> None:
        """Toy."""

    return app


def _invoke(app: typer.Typer, *args: str):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    result.plain = _ANSI.sub("", result.output)
    return result


def test_a_new_setting_is_one_field() -> None:
    app = _toy_app()
    help_text = _invoke(app, "fit", "--help").plain
    assert "--rate" in help_text and "How fast the toy learns." in help_text and "0.5" in help_text
    assert "--focal" in help_text and "--plain" in help_text and "--archive" in help_text
    assert _invoke(app, "fit", "--archive", "a.zarr", "--rate", "2", "--focal").plain.strip() == "rate=2.0 focal=True"
    shown = yaml.safe_load(_invoke(app, "fit", "--archive", "a.zarr", "--show-config").plain)
    assert shown == {"archive": "a.zarr", "loss": {"rate": 0.5, "focal": False}}
    bad = _invoke(app, "fit", "--archive", "a.zarr", "--rate", "-1")
    assert bad.exit_code != 0 and "greater than 0" in str(bad.exception)


def test_a_config_file_and_options_meet(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("archive: a.zarr\nloss:\n  rate: 1e-3\n  focal: true\n")  # YAML reads 1e-3 as text
    result = _invoke(_toy_app(), "fit", "--config", str(tmp_path / "c.yaml"), "--plain")
    assert result.plain.strip() == "rate=0.001 focal=False"


def _targets(cls: type, selectors: list) -> set[str]:
    return {t for s in option_specs(cls, selectors) for t in s.targets}


def test_every_visible_setting_is_an_option_of_its_command() -> None:
    """train offers every network and optimisation setting, segment and evaluate every inference one."""
    train = _targets(TrainFlowConfig, ["*", "unet.*", "train.*"])
    assert {f"train.{n}" for n in TrainConfig.__pydantic_fields__} <= train
    assert {f"unet.{n}" for n in UNetConfig.__pydantic_fields__} - train == {"unet.in_channels"}  # grey OCT only
    for cls in (SegmentConfig, EvaluateConfig):
        assert {f"inference.{n}" for n in InferenceConfig.__pydantic_fields__} <= _targets(cls, ["*", "inference.*"])


def test_speed_only_settings_are_declared_with_the_setting() -> None:
    assert not affects_result(TrainConfig, "num_workers")
    assert affects_result(TrainConfig, "lr") and affects_result(TrainConfig, "seed")
    # a setting added later counts only away from its default: runs from before it existed still match
    assert "elastic_sigma" not in fingerprint_settings(TrainConfig()) and "num_workers" not in fingerprint_settings(
        TrainConfig())
    assert fingerprint_settings(TrainConfig(elastic_sigma=5.0))["elastic_sigma"] == 5.0
    assert fingerprint_settings(UNetConfig()) == UNetConfig().to_dict()
