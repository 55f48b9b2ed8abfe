"""Rewards: the contract (`api`), recipe config (`config`), the scorer and its pools, built-ins.

The module itself is callable, so that `@rlsys.reward(name=...)` registers a reward:

    import rlsys.reward

    @rlsys.reward(name="short", batched=False)
    def short(prompt: str, response: str, **meta) -> float: ...

See `rlsys.reward.api` for the full contract.
"""

from __future__ import annotations

import sys
import types
from typing import Any

# Everything is imported on first use: `rlsys.config` imports `rlsys.reward.config` (the
# recipe schema), so this package must not import `rlsys.config` when it is first imported;
# and process-pool children import it and should start fast.
_LAZY = {
    **dict.fromkeys(
        ["LoadedReward", "RewardFn", "build_reward", "load_callable", "load_reward"],
        "rlsys.reward.api",
    ),
    **dict.fromkeys(["registered", "reward"], "rlsys.reward.api"),
    **dict.fromkeys(
        ["RewardConfig", "RewardPartConfig", "validate_reward_config"], "rlsys.reward.config"
    ),
    **dict.fromkeys(
        ["RewardScorer", "RewardInput", "RewardOutcome", "RewardError", "build_scorer"],
        "rlsys.reward.scorer",
    ),
}

__all__ = [
    "LoadedReward",
    "RewardConfig",
    "RewardError",
    "RewardFn",
    "RewardInput",
    "RewardOutcome",
    "RewardPartConfig",
    "RewardScorer",
    "build_reward",
    "build_scorer",
    "load_callable",
    "load_reward",
    "registered",
    "reward",
    "validate_reward_config",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlsys.reward' has no attribute '{name}'")


class _CallableModule(types.ModuleType):
    """`rlsys.reward(...)` is the `reward` decorator."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from rlsys.reward.api import reward

        return reward(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
