"""The recipes in flows/recipes: each is a valid train config, and the Duke fluid recipes run through the
command on per-subject volumes of the real data (shortened here; skipped without ../shared/data)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from tests.flows.cli_runner import invoke

RECIPES = sorted((Path(__file__).resolve().parents[2] / "flows" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_is_a_valid_train_config(recipe: Path, tmp_path: Path) -> None:
    result = invoke("train", "--config", str(recipe), "--archive", str(tmp_path / "a.zarr"), "--show-config")
    assert result.exit_code == 0, result.plain
    shown = yaml.safe_load(result.plain)
    declared = yaml.safe_load(recipe.read_text())
    for section in ("unet", "train"):
        assert {k: shown[section][k] for k in declared.get(section, {})} == declared.get(section, {})


def test_the_duke_recipes_are_fold_ensembles() -> None:
    for name in ("duke-dme-fluid-fast.yaml", "duke-dme-fluid-accurate.yaml"):
        assert yaml.safe_load((RECIPES[0].parent / name).read_text())["folds"] >= 2


def _per_subject_volumes(duke: Path, root: Path) -> tuple[list[Path], Path]:
    """One folder of B-scans per subject (and its masks), as the README's recipe section builds them."""
    labels = root / "labels"
    for row in csv.DictReader(open(duke / "index.csv")):
        for folder, kind in ((root / row["subject"], "images"), (labels / row["subject"], "masks")):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"b{int(row['bscan_index_0based']):03d}.png").symlink_to(duke / kind / f"{row['file_stem']}.png")
    return sorted(p for p in root.iterdir() if p.name.startswith("Subject_")), labels


def test_fast_recipe_cross_validates_real_subjects_through_the_command(shared_data: Path, tmp_path: Path) -> None:
    subjects, labels = _per_subject_volumes(shared_data / "duke_dme_fluid", tmp_path / "duke")
    archive, tracking = tmp_path / "duke.zarr", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert invoke("ingest", *map(str, subjects), "--labels", str(labels), "--archive", str(archive)).exit_code == 0
    assert invoke("preprocess", "--archive", str(archive), "--workers", "1").exit_code == 0
    recipe = RECIPES[0].parent / "duke-dme-fluid-fast.yaml"
    result = invoke("train", "--config", str(recipe), "--archive", str(archive), "--tracking-uri", tracking,
                    "--epochs", "2", "--tiles-per-epoch", "4")  # the recipe, shortened for the test suite
    assert result.exit_code == 0, result.plain
    line = next(x for x in result.plain.splitlines() if x.startswith("train: trained"))
    assert "out-of-fold (3 folds) fluid Dice" in line and "95% CI over subjects" in line
    assert all(f"Subject_0{i}" in line for i in range(1, 7))  # each subject scored by the fold that left it out
    from octseg.tasks.tracking.models import resolve_model

    ref = resolve_model("models:/octseg-unet@champion", tracking)
    assert ref.members == 3 and ref.tta and ref.unet_config["scale_y"] == yaml.safe_load(recipe.read_text())["unet"]["scale_y"]
