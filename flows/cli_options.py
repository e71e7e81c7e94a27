"""The ``octseg`` command's options, derived from the config objects: nothing here names a setting.

Each setting is declared once in its config (:mod:`octseg.unet.config`, :mod:`octseg.flows.config`):
type, default, check and help sentence, plus a :class:`~octseg.unet.config.Cli` marker where its
command-line name differs from ``--<name>``. :func:`config_command` turns a config class and a list of
selectors into a typer command whose options are those settings: ``"*"`` (every top-level setting),
``"train.*"`` (every setting of a nested config), a dotted key, or a tuple of dotted keys that one option
sets together (the pipeline's ``--archive`` sets every stage's). ``--config FILE``, ``--show-config`` and
``--verbose`` are added to every such command; :func:`settings` builds the config from the file, then
the options given.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from octseg.flows.config import PANELS, load_config_file
from octseg.unet.config import Cli

__all__ = ["EXPLICIT_NONE", "OptionSpec", "config_command", "option_specs", "settings"]

EXPLICIT_NONE = object()  # an option that sets a setting to None (e.g. --no-balanced over a config file)
Selector = str | tuple[str, ...]

ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="YAML or JSON file of this command's settings; options given here override it.",
    rich_help_panel="Settings")]
ShowOpt = Annotated[bool, typer.Option(
    "--show-config", help="Print the settings this command would run with (YAML), then stop.",
    rich_help_panel="Settings")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", help="Also show third-party INFO logs (Dask, MLflow) and the tracebacks of failed items.",
    rich_help_panel="Settings")]


# ---- reading the declarations ------------------------------------------------------------------

def _fields(cls: type) -> dict[str, FieldInfo]:
    """The pydantic fields of a config model or pydantic dataclass."""
    return cls.model_fields if issubclass(cls, BaseModel) else cls.__pydantic_fields__  # type: ignore[attr-defined]


def _nested(info: FieldInfo) -> type | None:
    """The config class a field holds (a nested settings object), else None."""
    t = info.annotation
    return t if isinstance(t, type) and (issubclass(t, BaseModel) or is_dataclass(t)) else None


def _cli(info: FieldInfo) -> Cli:
    return next((m for m in info.metadata if isinstance(m, Cli)), Cli())


def _lookup(cls: type, dotted: str) -> tuple[type, str, FieldInfo]:
    """(class that declares it, its name, its field) of ``dotted`` in ``cls``; KeyError names the key."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        nested = _nested(_fields(cls)[part])
        if nested is None:
            raise KeyError(f"{dotted}: {part} is not a nested config")
        cls = nested
    return cls, leaf, _fields(cls)[leaf]


def _expand(cls: type, selector: str) -> list[str]:
    """Dotted keys of ``prefix.*`` (every visible setting of that level) or of one dotted key."""
    if not selector.endswith("*"):
        return [selector]
    prefix = selector[:-1]  # "" or "train."
    owner = _nested(_lookup(cls, prefix[:-1])[2]) if prefix else cls
    return [prefix + name for name, info in _fields(owner).items() if _nested(info) is None and not _cli(info).hidden]


# ---- one option --------------------------------------------------------------------------------

def _option_type(annotation: Any) -> Any:
    """The command-line type of a setting: None stripped, tuples as lists, a Literal as its value type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def _shown_default(info: FieldInfo, cli: Cli) -> bool | str:
    if cli.show_default is not None:
        return cli.show_default
    default = info.default_factory() if info.default_factory is not None else info.default
    return "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


@dataclass(frozen=True)
class OptionSpec:
    """One command-line option (or argument) and the dotted settings it sets."""

    targets: tuple[str, ...]
    param: str  # the Python parameter name
    annotation: Any
    info: Any  # typer.Option(...) / typer.Argument(...)
    flag_value: Any = None

    def value(self, given: Any) -> Any:
        """What the option puts into the config: None = not given."""
        if given is None or self.flag_value is None:
            return [str(v) for v in given] if isinstance(given, (list, tuple)) else given
        return self.flag_value if given else EXPLICIT_NONE


def _spec(cls: type, selector: Selector) -> OptionSpec:
    targets = (selector,) if isinstance(selector, str) else selector
    owner, name, info = _lookup(cls, targets[0])
    cli = _cli(info)
    kind = bool if cli.flag_value is not None else _option_type(info.annotation)
    panel = cli.panel if cli.panel is not None else PANELS.get(owner)
    if cli.argument:
        parameter = typer.Argument(None, metavar=cli.metavar, show_default=False, help=info.description)
    else:
        flags = cli.flags or ((f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",) if kind is bool
                              else (f"--{name.replace('_', '-')}",))
        parameter = typer.Option(None, *flags, help=info.description, show_default=_shown_default(info, cli),
                                 rich_help_panel=panel, metavar=cli.metavar)
    return OptionSpec(targets, name, Optional[kind], parameter, cli.flag_value)


def option_specs(cls: type, selectors: list[Selector]) -> list[OptionSpec]:
    """The options of a command over config ``cls``; ValueError if two would share a parameter name."""
    specs = [_spec(cls, key) for s in selectors for key in ([s] if isinstance(s, tuple) else _expand(cls, s))]
    names = [s.param for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"options of {cls.__name__} share parameter names: {sorted(names)}")
    return specs


# ---- the command -------------------------------------------------------------------------------

def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config: {part} must be a mapping of settings, got {node!r}")
        data = node
    data[leaf] = value


def _located(error: dict, config_file: Path, given: set[str]) -> str:
    """A validation error as ``[config file F: ]field: message``: F when the value came from the file."""
    field = ".".join(map(str, error["loc"]))
    from_option = not field or any(field == g or field.startswith(g + ".") or g.startswith(field + ".")
                                   for g in given)  # "": the whole config; "unet": a rule across its settings
    return f"{'' if from_option else f'config file {config_file}: '}{field or 'config'}: {error['msg']}"


def settings(cls: Any, config_file: Path | None, show: bool, options: dict[str, Any]) -> Any:
    """``cls`` from the config file, then every option given (``None`` = not given); ``--show-config``
    prints it as YAML (which ``--config`` reads back) and stops."""
    data = load_config_file(config_file) if config_file is not None else {}
    given = set()
    for dotted, value in options.items():
        if value is EXPLICIT_NONE or value is not None:
            _set(data, dotted, None if value is EXPLICIT_NONE else value)
            given.add(dotted)
    try:
        config = cls.model_validate(data)
    except ValidationError as e:  # a setting from the file: the error names the file
        if config_file is None:
            raise
        raise ValueError("; ".join(_located(err, config_file, given) for err in e.errors())) from None
    if show:
        import yaml

        typer.echo(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
        raise typer.Exit(0)
    return config


def config_command(app: typer.Typer, cls: type, selectors: list[Selector], *,
                   before: Callable[[bool], None] = lambda verbose: None) -> Callable[[Callable], Callable]:
    """Register ``body(config, verbose)`` as a command whose options are the settings ``selectors`` pick.

    The command's name and help are the body's; ``before(verbose)`` runs first (e.g. logging set-up that
    must precede third-party imports).
    """
    specs = option_specs(cls, selectors)

    def decorate(body: Callable[[Any, bool], None]) -> Callable:
        def command(**kwargs: Any) -> None:
            verbose = kwargs.pop("verbose")
            before(verbose)
            options = {t: spec.value(kwargs[spec.param]) for spec in specs for t in spec.targets}
            return body(settings(cls, kwargs.pop("config"), kwargs.pop("show_config"), options), verbose)

        params = [inspect.Parameter(s.param, inspect.Parameter.KEYWORD_ONLY, default=s.info, annotation=s.annotation)
                  for s in specs]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
                   for n, a, d in (("config", ConfigOpt, None), ("show_config", ShowOpt, False),
                                   ("verbose", VerboseOpt, False))]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__doc__ = body.__name__, body.__doc__
        app.command(body.__name__)(command)
        return body

    return decorate
