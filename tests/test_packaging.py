"""The installed distribution owns one import name, ``octseg``: the bare names unet, tasks and flows
belong to other projects on the package index."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_octseg_namespace(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "unet", "tasks", "flows", "tests"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--disable-pip-version-check", "--wheel-dir", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("octseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"octseg"}, top
    for package in ("unet", "tasks", "flows"):
        assert f"octseg/{package}/__init__.py" in names
    sub_packages = [init.relative_to(ROOT).as_posix() for folder in ("unet", "tasks", "flows")
                    for init in (ROOT / folder).rglob("__init__.py")]
    missing = [f"octseg/{init}" for init in sub_packages if f"octseg/{init}" not in names]
    assert not missing, f"sub-packages missing from pyproject.toml's [tool.setuptools] packages: {missing}"
    assert not any(n.startswith("octseg/tests") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "octseg = octseg.flows.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
