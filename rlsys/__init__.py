"""rlsys: reinforcement-learning post-training for language models.

Public API: `load_recipe`, `train`, `Sample`, `SampleGroup`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from rlsys.config import RecipeConfig


def load_recipe(path: str | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Load and validate a recipe (see `rlsys.config`)."""
    from rlsys.config import load_recipe as _load

    return _load(path, overrides)


def train(cfg: RecipeConfig, recipe_path: str | None = None) -> dict[str, Any]:
    """Run a recipe (see `rlsys.controller.train`)."""
    from rlsys.controller import train as _train

    return _train(cfg, recipe_path)


def __getattr__(name: str) -> Any:
    if name == "reward":
        import importlib

        return importlib.import_module("rlsys.reward")
    if name in ("Sample", "SampleGroup", "TrainBatch"):
        from rlsys import types

        return getattr(types, name)
    raise AttributeError(name)
