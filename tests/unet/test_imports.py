"""unet/ is pure PyTorch/NumPy/SciPy/scikit-image: importing it must not pull in the pipeline stack."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import octseg.unet as unet

FORBIDDEN = ("prefect", "mlflow", "zarr", "dask", "distributed", "ome_zarr")
UNET_DIR = Path(unet.__file__).resolve().parent


def test_unet_imports_no_orchestration_or_storage_packages(tmp_path: Path) -> None:
    modules = ["octseg.unet"] + sorted(f"octseg.unet.{p.stem}" for p in UNET_DIR.glob("*.py") if p.stem != "__init__")
    assert {f"octseg.unet.{m}" for m in ("model", "losses", "metrics", "config", "parts")} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
