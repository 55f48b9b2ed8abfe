"""Rewards in every call form, loaded by file path the way a user's would be."""

from __future__ import annotations

import asyncio
import os
import time

import rlsys.reward


def contains(prompt: str, response: str, word: str = "yes", **meta) -> dict:
    """Per sample, with a recipe kwarg and a dict return."""
    return {"score": float(word in response), "chars": len(response)}


def needs_answer(prompt: str, response: str, answer: str) -> float:
    """No **meta: gets only the fields it names."""
    return float(response.strip() == str(answer))


async def async_len(prompt: str, response: str, **meta) -> float:
    await asyncio.sleep(0.01)
    return float(len(response))


def batch_len(samples: list, scale: float = 1.0) -> list[float]:
    """Batched, inferred from the first parameter's name."""
    return [len(s.meta["response_text"]) * scale for s in samples]


@rlsys.reward(name="test_batch_tokens", batched=True)
async def batch_tokens(batch: list) -> list[dict]:
    """Batched by declaration, async, reads token ids."""
    return [{"score": float(len(s.response_ids)), "group": s.group_id} for s in batch]


@rlsys.reward(name="test_registered")
def registered_reward(prompt: str, response: str, **meta) -> float:
    return 0.5


class Judge:
    """A class reward: kwargs in the constructor, heavy work in setup()."""

    setups = 0

    def __init__(self, bonus: float = 0.0) -> None:
        self.bonus = bonus
        self.table: dict[str, float] | None = None

    def setup(self) -> None:
        type(self).setups += 1
        self.table = {"good": 1.0, "bad": -1.0}

    def __call__(self, prompt: str, response: str, **meta) -> float:
        assert self.table is not None, "setup() must run before the first call"
        return self.table.get(response, 0.0) + self.bonus


class BatchJudge:
    batched = True

    def __call__(self, samples: list) -> list[float]:
        return [float(s.index) for s in samples]


class PidReward:
    """Scores the process it runs in (process-pool tests)."""

    def setup(self) -> None:
        self.pid = os.getpid()

    def __call__(self, prompt: str, response: str, **meta) -> float:
        return float(self.pid)


def broken(prompt: str, response: str, **meta) -> float:
    if "ok" in response:
        return 1.0
    raise RuntimeError(f"cannot grade {response!r}")


def nan_reward(prompt: str, response: str, **meta) -> float:
    return float("nan")


def no_score(prompt: str, response: str, **meta) -> dict:
    return {"accuracy": 1.0}


def short_batch(samples: list) -> list[float]:
    return [1.0]


def sleepy(prompt: str, response: str, **meta) -> float:
    time.sleep(float(meta.get("sleep", 0.0)))
    return 1.0


async def async_sleepy(prompt: str, response: str, **meta) -> float:
    await asyncio.sleep(float(meta.get("sleep", 0.0)))
    return 1.0


def die(prompt: str, response: str, **meta) -> float:
    if response == "die":
        os._exit(3)
    return 1.0


not_callable = 42


class FailingSetup:
    def setup(self) -> None:
        raise OSError("model weights not found")

    def __call__(self, prompt: str, response: str, **meta) -> float:
        return 1.0
