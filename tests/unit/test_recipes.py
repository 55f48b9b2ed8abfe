"""Every YAML under recipes/ loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlsys.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml"))


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads(path: Path) -> None:
    cfg = load_recipe(path)
    assert cfg.steps > 0
    assert cfg.rollout.n_samples_per_prompt >= 2
