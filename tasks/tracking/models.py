"""Registered U-Nets in MLflow: log one with its config, resolve ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``,
load it (once per process), and find the run that registered one.

Public MLflow APIs only, each call on an ``MlflowClient`` bound to an explicit tracking URI, except
``Model.log`` which logs into the active run (see :func:`octseg.tasks.tracking.uri.using_tracking_uri`).
``mlflow`` and ``torch`` are imported inside the functions so that ``octseg --help`` stays fast. Which
version is the champion is :mod:`octseg.tasks.tracking.champion`.

How a model is stored (flavor ``octseg_unet``, see :func:`log_unet`)::

    MLmodel               flavors.octseg_unet {weights, unet_config, torch_version}; metadata.unet_config
    weights.pt            the state_dict, torch.save (of a UNetEnsemble: its members' under members.<i>.)
    unet_config.json      UNetConfig.to_dict(): the config that rebuilds the network (each member's)
    model.json            {"members": N, "postprocess": PostprocessConfig.to_dict(), "tta": bool}: an
                          ensemble of N networks (1: a single U-Net), the post-processing chosen for it,
                          and whether it predicts with test-time flips by default
    requirements.txt      the pip requirements given to log_unet (nothing is inferred)

A model logged before ``model.json`` existed is one network without post-processing.
"""
from __future__ import annotations

import io
import json
import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from octseg.tasks.tracking.uri import check_tracking_uri, client

if TYPE_CHECKING:
    import torch

    from octseg.unet.model import UNet

__all__ = ["CONFIG_FILE", "FLAVOR_NAME", "MODEL_FILE", "WEIGHTS_FILE", "ModelRef", "cached_unet", "default_pip_requirements",
           "find_registered_run", "load_unet", "log_unet", "resolve_model"]

log = logging.getLogger(__name__)

FLAVOR_NAME = "octseg_unet"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "unet_config.json"
MODEL_FILE = "model.json"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


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
        members = len(getattr(unet, "members", [unet]))
        (folder / MODEL_FILE).write_text(json.dumps({"members": members, "postprocess": unet.postprocess.to_dict(),
                                                     "tta": bool(getattr(unet, "tta", False)),
                                                     "trained_on": getattr(unet, "trained_on", None)}))
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

    - a pickle stores references to ``octseg.unet.model``/``octseg.unet.parts`` classes, so renaming or moving a
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
    members: int = 1  # networks averaged (a cross-validation ensemble); 1: one U-Net
    postprocess: dict | None = None  # PostprocessConfig.to_dict() chosen for it; None: none
    tta: bool = False  # it was scored with test-time flips and predicts with them unless told otherwise
    # the volumes that trained it or chose its epoch: id -> its source's SHA-256 (None: unknown); None: not recorded
    trained_on: dict | None = None


def _describe(mlflow_client, name: str) -> str:
    """``existing versions [1, 2], aliases {'champion': '2'}`` of registered model ``name``, for errors."""
    versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'"))
    aliases = {a: str(v) for a, v in mlflow_client.get_registered_model(name).aliases.items()}
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
    # MLflow would create and migrate an empty database just to report that nothing is there
    check_tracking_uri(tracking_uri, must_exist=True)
    mlflow_client = client(tracking_uri)
    try:
        registered = mlflow_client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"no registered model {name!r} in {tracking_uri}; run `octseg train` first") from None
    if alias is not None:
        if alias not in registered.aliases:
            raise ValueError(
                f"no model {name!r} with alias {alias!r} in {tracking_uri}; "
                f"{_describe(mlflow_client, name)}; run `octseg train` first or use models:/{name}/VERSION"
            )
        version = str(registered.aliases[alias])
    versions = {str(v.version): v for v in mlflow_client.search_model_versions(f"name='{name}'")}
    if str(version) not in versions:
        raise ValueError(f"model {name!r} has no version {version} in {tracking_uri}; {_describe(mlflow_client, name)}")
    pinned = f"models:/{name}/{version}"
    config = json.loads(_download(tracking_uri, name, str(version), CONFIG_FILE).decode())
    try:
        model = json.loads(_download(tracking_uri, name, str(version), MODEL_FILE).decode())
    except ValueError:  # logged before model.json: one network, no post-processing
        model = {}
    return ModelRef(name, str(version), versions[str(version)].run_id, pinned, config,
                    members=int(model.get("members", 1)), postprocess=model.get("postprocess"),
                    tta=bool(model.get("tta", False)), trained_on=model.get("trained_on"))


def _download(tracking_uri: str, name: str, version: str, filename: str) -> bytes:
    """Bytes of ``filename`` in the folder of registered model version ``name/version``.

    Goes through ``get_model_version_download_uri``: ``download_artifacts("models:/NAME/VERSION/...",
    tracking_uri=..., registry_uri=...)`` ignores both arguments when it resolves the name (MLflow
    3.17.2 uses the global registry URI, i.e. a fresh ./mlflow.db in the working directory).
    """
    import mlflow

    folder = client(tracking_uri).get_model_version_download_uri(name, version)
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
    """Rebuild the registered U-Net: ``UNet.from_config(saved config)`` (or an ensemble of ``ref.members`` of
    them) + the saved ``state_dict``, in eval mode, with the post-processing chosen for it."""
    import torch

    from octseg.unet.config import PostprocessConfig, UNetConfig
    from octseg.unet.ensemble import UNetEnsemble
    from octseg.unet.inference import resolve_device
    from octseg.unet.model import UNet

    device = device if isinstance(device, torch.device) else resolve_device(device)
    config = UNetConfig.from_dict(ref.unet_config)
    model = UNet.from_config(config) if ref.members == 1 else UNetEnsemble(
        [UNet.from_config(config) for _ in range(ref.members)])
    model.postprocess = PostprocessConfig.from_dict(ref.postprocess or {})
    model.tta = ref.tta
    weights = _download(tracking_uri, ref.name, ref.version, WEIGHTS_FILE)
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ref.uri}: weights do not fit its saved config {ref.unet_config}: {e}") from e
    return model.to(device).eval()


def find_registered_run(tracking_uri: str, experiment_id: str, model_name: str, tag: str, value: str):
    """The newest FINISHED run of ``experiment_id`` tagged ``tag=value`` that registered a version of
    ``model_name``, as ``(run, version)``; None when there is none (so "already trained")."""
    mlflow_client = client(tracking_uri)
    runs = mlflow_client.search_runs([experiment_id], f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'",
                                     order_by=["attributes.start_time DESC"])
    for run in runs:
        versions = mlflow_client.search_model_versions(f"name = '{model_name}' and run_id = '{run.info.run_id}'")
        if versions:
            return run, str(versions[0].version)
    return None


_MODELS: dict[tuple[str, str, str], object] = {}
_MODELS_LOCK = threading.Lock()


def cached_unet(ref: ModelRef, tracking_uri: str, device: str = "auto") -> UNet:
    """The registered U-Net ``ref``, loaded once per process (tasks receive the reference, not weights)."""
    from octseg.unet.inference import resolve_device

    key = (ref.uri, tracking_uri, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_unet(ref, tracking_uri, device=resolve_device(device))
        return _MODELS[key]  # type: ignore[return-value]
