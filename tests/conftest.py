"""Test environment: caches inside the project (or a temp dir), W&B offline, Ray without auth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RLSYS_CACHE", str(ROOT / ".cache" / "rlsys"))
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rlsys import models

    return models.resolve(models.TINY)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from rlsys import models

    return models.resolve(models.SMOLLM2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are deselected (not skipped) unless --gpu is given."""
    if config.getoption("--gpu"):
        return
    keep = [i for i in items if i.get_closest_marker("gpu") is None]
    dropped = [i for i in items if i.get_closest_marker("gpu") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
