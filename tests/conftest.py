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


def _synthetic_groups(n_groups: int = 3, n: int = 4, seed: int = 0) -> list:
    """Finished, scored groups of random token ids (ids < 300, mixed lengths)."""
    import random

    from rlsys.types import Sample, SampleGroup, Status

    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(3, 8))]
        samples = []
        for j in range(n):
            s = Sample(group_id=g, index=j, prompt_ids=prompt)
            k = rng.randint(1, 12)
            s.append(
                [rng.randrange(5, 300) for _ in range(k)],
                [-rng.random() for _ in range(k)],
                0,
                True,
            )
            s.finish(Status.DONE, "stop")
            s.reward = float(rng.random() < 0.5) + 0.1 * j
            samples.append(s)
        out.append(SampleGroup(g, samples))
    return out


@pytest.fixture(scope="session")
def synthetic_groups():
    """`synthetic_groups(n_groups=3, n=4, seed=0)` -> list[SampleGroup]."""
    return _synthetic_groups
