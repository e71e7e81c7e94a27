"""MLflow 3 at the edge: tracking URIs, the experiment, and the U-Net in the model registry.

Plain functions; ``mlflow`` and ``torch`` are imported inside them so that ``octseg --help`` stays fast.
Every function takes the tracking URI explicitly (:func:`resolve_tracking_uri` picks the default once,
in the flow) and uses an ``MlflowClient`` bound to it. Only the fluent calls of a training run need
MLflow's process-global URI; :func:`using_tracking_uri` sets it for their duration and restores it.

How a model is stored (flavor ``octseg_unet``, see :func:`log_unet`)::

    MLmodel               flavors.octseg_unet {weights, unet_config, torch_version}; metadata.unet_config
    weights.pt            the state_dict, torch.save
    unet_config.json      UNetConfig.to_dict(): the config that rebuilds the network
    requirements.txt      the pip requirements given to log_unet (nothing is inferred)
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from octseg.unet.model import UNet

__all__ = [
    "CHAMPION",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_MODEL_NAME",
    "FLAVOR_NAME",
    "ModelRef",
    "default_pip_requirements",
    "ensure_experiment",
    "load_unet",
    "log_unet",
    "promote_if_better",
    "resolve_model",
    "resolve_tracking_uri",
    "using_tracking_uri",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "octseg-unet"
DEFAULT_EXPERIMENT = "octseg"
CHAMPION = "champion"
FLAVOR_NAME = "octseg_unet"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "unet_config.json"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlflow.db``."""
    if uri:
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_metrics``, ...) at ``uri`` for a block.

    ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI`` and MLflow's own context manager
    unsets it on exit; this one restores the variable as it was.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _sqlite_path(tracking_uri: str) -> str | None:
    """The database path of a ``sqlite:///`` URI (query string dropped), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]


def _artifact_root(tracking_uri: str) -> str | None:
    """Artifact root beside a SQLite database (``<db dir>/mlartifacts``); None: the store decides."""
    if not tracking_uri.startswith("sqlite:"):
        if tracking_uri.startswith(("postgresql", "mysql", "mssql")):
            log.warning("%s: experiments get MLflow's default artifact location (./mlruns)", tracking_uri)
        return None  # http(s): the server decides; file stores keep artifacts inside the store
    path = _sqlite_path(tracking_uri)
    if path in (None, "", ":memory:"):
        raise ValueError(f"need a SQLite file URI like sqlite:////abs/path/mlflow.db, got {tracking_uri!r}")
    return (Path(path).resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """Id of experiment ``name``, created if missing with its artifacts beside a SQLite database."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = _artifact_root(tracking_uri)
        location = f"{root}/{name}" if root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # created concurrently by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            log.debug("experiment %r appeared while creating it: %s", name, e)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"experiment {name!r} in {tracking_uri} is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or use another name"
        )
    return experiment.experiment_id


def default_pip_requirements() -> list[str]:
    """Pinned requirements to rebuild a logged U-Net (given explicitly: MLflow's inference costs ~3.4 s)."""
    import mlflow
    import numpy
    import torch

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


class _UNetFlavor:
    """The ``octseg_unet`` flavor that ``mlflow.models.Model.log`` calls to write a model folder."""

    @staticmethod
    def save_model(path: str, mlflow_model, unet: UNet, pip_requirements: list[str]) -> None:
        import torch

        from mlflow.models.model import MLMODEL_FILE_NAME

        folder = Path(path)
        folder.mkdir(parents=True)
        state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
        torch.save(state, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(unet.config.to_dict(), indent=2))
        (folder / "requirements.txt").write_text("\n".join(pip_requirements) + "\n")
        mlflow_model.add_flavor(
            FLAVOR_NAME, weights=WEIGHTS_FILE, unet_config=CONFIG_FILE, torch_version=str(torch.__version__)
        )
        mlflow_model.save(str(folder / MLMODEL_FILE_NAME))


def log_unet(
    unet: UNet,
    registered_model_name: str,
    name: str = "unet",
    pip_requirements: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Log ``unet`` to the ACTIVE run as an MLflow 3 logged model and register it; returns the version.

    Weights are stored as a ``state_dict`` beside the ``UNetConfig`` (nanoGPT style), not as a pickled
    module (``mlflow.pytorch.log_model(serialization_format="pickle")``) nor as ``pt2``:

    - a pickle stores references to ``unet.model``/``unet.parts`` classes, so renaming or moving a
      block breaks every registered version, and unpickling runs arbitrary code;
    - ``pt2`` (``torch.export``) freezes the input sizes unless every dimension is declared dynamic,
      and the valid-padding U-Net accepts only some sizes, which ``forward`` checks in Python;
    - a ``state_dict`` loads with ``torch.load(weights_only=True)`` (no code runs) into
      ``UNet.from_config(config)``, and a config/weights mismatch fails loudly in ``load_state_dict``.

    The price is that MLflow's generic loaders (``mlflow.pyfunc``) cannot load it; :func:`load_unet` can.
    """
    import mlflow
    from mlflow.models import Model

    if mlflow.active_run() is None:
        raise RuntimeError("log_unet needs an active MLflow run (call it inside mlflow.start_run())")
    info = Model.log(
        artifact_path=None,  # positional in Model.log's signature although deprecated in favour of name
        name=name,
        flavor=_UNetFlavor,
        flavor_name=FLAVOR_NAME,
        registered_model_name=registered_model_name,
        metadata={"unet_config": unet.config.to_dict(), **(metadata or {})},
        unet=unet,
        pip_requirements=pip_requirements if pip_requirements is not None else default_pip_requirements(),
    )
    return str(info.registered_model_version)


@dataclass(frozen=True)
class ModelRef:
    """A registered U-Net version: ``uri`` is always the pinned ``models:/NAME/VERSION``."""

    name: str
    version: str
    run_id: str | None
    uri: str
    unet_config: dict


def _describe(client, name: str) -> str:
    """``existing versions [1, 2], aliases {'champion': '2'}`` of registered model ``name``, for errors."""
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    return f"existing versions {versions}, aliases {aliases or 'none'}"


def resolve_model(model_uri: str, tracking_uri: str) -> ModelRef:
    """Resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` to a pinned version and its U-Net config.

    Raises ValueError naming what exists when the URI is malformed or the model, alias or version is
    missing, before anything is downloaded.
    """
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise ValueError(f"model URI must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    name, alias, version = match["name"], match["alias"], match["version"]
    db = _sqlite_path(tracking_uri)
    if db not in (None, ":memory:") and not Path(db).is_file():
        # MLflow would create and migrate an empty database just to report that nothing is there
        raise ValueError(f"no MLflow database at {tracking_uri}; run `octseg train` first or pass --tracking-uri")
    client = _client(tracking_uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"no registered model {name!r} in {tracking_uri}; run `octseg train` first") from None
    if alias is not None:
        if alias not in registered.aliases:
            raise ValueError(
                f"no model {name!r} with alias {alias!r} in {tracking_uri}; "
                f"{_describe(client, name)}; run `octseg train` first or use models:/{name}/VERSION"
            )
        version = str(registered.aliases[alias])
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    if str(version) not in versions:
        raise ValueError(f"model {name!r} has no version {version} in {tracking_uri}; {_describe(client, name)}")
    pinned = f"models:/{name}/{version}"
    config = json.loads(_download(tracking_uri, name, str(version), CONFIG_FILE).decode())
    return ModelRef(name, str(version), versions[str(version)].run_id, pinned, config)


def _download(tracking_uri: str, name: str, version: str, filename: str) -> bytes:
    """Bytes of ``filename`` in the folder of registered model version ``name/version``.

    Goes through ``get_model_version_download_uri``: ``download_artifacts("models:/NAME/VERSION/...",
    tracking_uri=..., registry_uri=...)`` ignores both arguments when it resolves the name (MLflow
    3.17.2 uses the global registry URI, i.e. a fresh ./mlflow.db in the working directory).
    """
    import mlflow

    folder = _client(tracking_uri).get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(prefix="octseg-model-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{folder.rstrip('/')}/{filename}", dst_path=tmp, tracking_uri=tracking_uri
            )
        except Exception as e:  # "not found" is a different exception per artifact repository
            raise ValueError(
                f"models:/{name}/{version} has no {filename} in {folder}: was it logged by octseg's log_unet?"
            ) from e
        return Path(path).read_bytes()


def load_unet(ref: ModelRef, tracking_uri: str, device: str | torch.device = "cpu") -> UNet:
    """Rebuild the registered U-Net: ``UNet.from_config(saved config)`` + the saved ``state_dict``, in eval mode."""
    import torch

    from octseg.unet.config import UNetConfig
    from octseg.unet.inference import resolve_device
    from octseg.unet.model import UNet

    device = device if isinstance(device, torch.device) else resolve_device(device)
    model = UNet.from_config(UNetConfig.from_dict(ref.unet_config))
    weights = _download(tracking_uri, ref.name, ref.version, WEIGHTS_FILE)
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ref.uri}: weights do not fit its saved config {ref.unet_config}: {e}") from e
    return model.to(device).eval()


def _metric_of(client, run_id: str | None, metric: str) -> float | None:
    if run_id is None:
        return None
    return client.get_run(run_id).data.metrics.get(metric)


def promote_if_better(
    name: str,
    version: str | int,
    score: float,
    tracking_uri: str,
    alias: str = CHAMPION,
    metric: str = "val_dice_fluid",
) -> bool:
    """Point ``alias`` at ``version`` if there is no champion or ``score`` beats its ``metric``; True if moved.

    The champion's score is the last value of ``metric`` in the run that produced it. A NaN score never
    beats a champion; a champion whose score is NaN loses to any finite score; a champion without
    ``metric`` is kept (the scores are not comparable) and a warning says so.
    """
    client = _client(tracking_uri)
    aliases = client.get_registered_model(name).aliases  # stores differ in how a missing alias fails
    current = client.get_model_version(name, aliases[alias]) if alias in aliases else None
    if current is not None:
        if str(current.version) == str(version):
            return False
        best = _metric_of(client, current.run_id, metric)
        if best is None:
            log.warning("%s@%s (v%s) has no metric %r: keeping it", name, alias, current.version, metric)
            return False
        if math.isnan(score) or not (math.isnan(best) or score > best):
            log.info("%s v%s: %s %.4f does not beat %s@%s (v%s) %.4f",
                     name, version, metric, score, name, alias, current.version, best)
            return False
    client.set_registered_model_alias(name, alias, str(version))
    log.info("%s v%s is now %s@%s (%s %.4f)", name, version, name, alias, metric, score)
    return True
