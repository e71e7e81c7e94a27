"""The MLflow model registry, owned here: log a U-Net with its config, resolve ``models:/NAME@ALIAS`` or
``models:/NAME/VERSION``, load it (once per process), find an identical earlier run, promote a champion.

Public MLflow APIs only, each call on an ``MlflowClient`` bound to an explicit tracking URI, except
``Model.log`` which logs into the active run (see :func:`octseg.tasks.tracking.using_tracking_uri`).
``mlflow`` and ``torch`` are imported inside the functions so that ``octseg --help`` stays fast.

How a model is stored (flavor ``octseg_unet``, see :func:`log_unet`)::

    MLmodel               flavors.octseg_unet {weights, unet_config, torch_version}; metadata.unet_config
    weights.pt            the state_dict, torch.save
    unet_config.json      UNetConfig.to_dict(): the config that rebuilds the network
    requirements.txt      the pip requirements given to log_unet (nothing is inferred)
"""
from __future__ import annotations

import io
import hashlib
import json
import logging
import math
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from octseg.tasks.tracking import check_tracking_uri, client

if TYPE_CHECKING:
    import torch

    from octseg.unet.bscans import BScanSet
    from octseg.unet.config import TrainConfig, UNetConfig
    from octseg.unet.model import UNet

__all__ = [
    "CHAMPION",
    "FOREGROUND",
    "REGISTERED",
    "TrainResult",
    "cached_eval_score",
    "champion",
    "find_previous_training",
    "promote_on_evaluation",
    "record_eval_score",
    "training_fingerprint",
    "ModelRef",
    "cached_unet",
    "find_registered_run",
    "load_unet",
    "log_unet",
    "promote_if_better",
    "resolve_model",
]

log = logging.getLogger(__name__)

CHAMPION = "champion"
FLAVOR_NAME = "octseg_unet"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "unet_config.json"
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
    return ModelRef(name, str(version), versions[str(version)].run_id, pinned, config)


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


REGISTERED = "registered_"  # metric prefix: the score of the weights a run registered


def _metric_of(mlflow_client, run_id: str | None, metric: str) -> float | None:
    """``metric`` of a run; for a ``registered_*`` metric that a run of an earlier octseg lacks, its last
    per-epoch value (what those runs registered)."""
    if run_id is None:
        return None
    metrics = mlflow_client.get_run(run_id).data.metrics
    value = metrics.get(metric)
    if value is None and metric.startswith(REGISTERED):
        value = metrics.get(metric.removeprefix(REGISTERED))
    return value


def promote_if_better(
    name: str,
    version: str | int,
    score: float,
    tracking_uri: str,
    alias: str = CHAMPION,
    *,
    metric: str,
) -> bool:
    """Point ``alias`` at ``version`` if there is no champion or ``score`` beats its ``metric``; True if moved.

    The champion's score is the last value of ``metric`` in the run that produced it. A NaN score never
    beats a champion; a champion whose score is NaN loses to any finite score; a champion without
    ``metric`` is kept (the scores are not comparable) and a warning says so.
    """
    mlflow_client = client(tracking_uri)
    aliases = mlflow_client.get_registered_model(name).aliases  # stores differ in how a missing alias fails
    current = mlflow_client.get_model_version(name, aliases[alias]) if alias in aliases else None
    if current is not None:
        if str(current.version) == str(version):
            return False
        best = _metric_of(mlflow_client, current.run_id, metric)
        if best is None:
            log.warning("%s@%s (v%s) has no metric %r: keeping it", name, alias, current.version, metric)
            return False
        if math.isnan(score) or not (math.isnan(best) or score > best):
            log.info("%s v%s: %s %.4f does not beat %s@%s (v%s) %.4f",
                     name, version, metric, score, name, alias, current.version, best)
            return False
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    log.info("%s v%s is now %s@%s (%s %.4f)", name, version, name, alias, metric, score)
    return True


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


FOREGROUND = 1  # the class whose Dice decides promotion
SPEED_ONLY = ("num_workers",)  # training settings that change how fast, not what is trained


@dataclass
class TrainResult:
    """What one training run produced; ``score`` is the final Dice of class 1 (validation if any)."""

    run_id: str
    model_name: str
    model_version: str
    val_dice: dict[int, float]  # final per-class Dice (on the training set when there is no validation set)
    score: float
    promoted: bool
    qc_image: str | None  # artifact URI of the QC PNG
    n_train: int = 0
    n_val: int = 0
    reused: bool = False  # an identical earlier run (same data, configs and model name) was found


def training_fingerprint(train: BScanSet, val: BScanSet | None, unet_config: UNetConfig,
                         train_config: TrainConfig, model_name: str) -> str:
    """sha256 over the training data, both configs and the model name: equal means "already trained"."""
    settings = {k: v for k, v in train_config.to_dict().items() if k not in SPEED_ONLY}
    h = hashlib.sha256(json.dumps([unet_config.to_dict(), settings, model_name], sort_keys=True).encode())
    for data in (train, val):
        for arr in () if data is None else (data.images, data.labels, data.weights):
            h.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def find_previous_training(fingerprint: str, tracking_uri: str, experiment_id: str, model_name: str,
                           names: Mapping[int, str]) -> TrainResult | None:
    """The finished, registered run with this fingerprint, as a result (``reused=True``), or None."""
    found = find_registered_run(tracking_uri, experiment_id, model_name, "octseg.fingerprint", fingerprint)
    if found is None:
        return None
    run, version = found
    prefix = "val" if run.data.tags.get("octseg.score_source") == "validation" else "train"
    client_ = client(tracking_uri)
    dice = {c: v if (v := _metric_of(client_, run.info.run_id, f"{REGISTERED}{prefix}_dice_{n}")) is not None
            else math.nan for c, n in names.items()}
    return TrainResult(run.info.run_id, model_name, version, dice, dice.get(FOREGROUND, math.nan), False, None,
                       n_train=int(run.data.params.get("data.n_train", 0)),
                       n_val=int(run.data.params.get("data.n_val", 0)), reused=True)


EVAL_SET_TAG = "octseg.eval_set"  # fingerprint of the evaluation set of the version's latest evaluation
EVAL_SCORE_TAG = "octseg.eval_score"  # its pooled foreground Dice


def _score_tag(fingerprint: str) -> str:
    return f"{EVAL_SCORE_TAG}.{fingerprint[:16]}"


def cached_eval_score(ref: ModelRef, fingerprint: str, tracking_uri: str) -> float | None:
    """The score of version ``ref`` on the evaluation set ``fingerprint`` recorded earlier, or None."""
    tags = client(tracking_uri).get_model_version(ref.name, ref.version).tags
    value = tags.get(_score_tag(fingerprint))
    return None if value is None else float(value)


def record_eval_score(ref: ModelRef, fingerprint: str, score: float, tracking_uri: str,
                      report_dir: str | Path | None = None) -> None:
    """Record on the version its score on the evaluation set (``octseg.eval_set``, ``octseg.eval_score``
    and a per-set ``octseg.eval_score.<fp16>`` that caches it) and log the report into the version's run
    under ``evaluation/<fp16>/``."""
    mlflow_client = client(tracking_uri)
    for key, value in ((EVAL_SET_TAG, fingerprint), (EVAL_SCORE_TAG, repr(float(score))),
                       (_score_tag(fingerprint), repr(float(score)))):
        mlflow_client.set_model_version_tag(ref.name, ref.version, key, value)
    if report_dir is not None and ref.run_id:
        mlflow_client.log_artifacts(ref.run_id, str(report_dir), artifact_path=f"evaluation/{fingerprint[:16]}")


def champion(name: str, tracking_uri: str, alias: str = CHAMPION) -> ModelRef | None:
    """The version ``alias`` points at, resolved, or None when there is none yet."""
    if alias not in client(tracking_uri).get_registered_model(name).aliases:
        return None
    return resolve_model(f"models:/{name}@{alias}", tracking_uri)


def promote_on_evaluation(ref: ModelRef, score: float, current: ModelRef | None, current_score: float | None,
                          tracking_uri: str, alias: str = CHAMPION) -> bool:
    """Point ``alias`` at ``ref`` when there is no champion or ``score`` beats the champion's score on the
    same evaluation set; True if moved. A NaN never wins; a champion scored NaN loses to any number."""
    if current is not None:
        if current.version == ref.version:
            return False
        if math.isnan(score) or not (current_score is None or math.isnan(current_score) or score > current_score):
            log.info("%s v%s: evaluation Dice %.4f does not beat %s@%s (v%s) %.4f", ref.name, ref.version, score,
                     ref.name, alias, current.version, current_score)
            return False
    client(tracking_uri).set_registered_model_alias(ref.name, alias, ref.version)
    log.info("%s v%s is now %s@%s (evaluation Dice %.4f)", ref.name, ref.version, ref.name, alias, score)
    return True
