"""Rewards: load a user function by name, score samples."""

from rlsys.reward.api import RewardFn, load_callable

__all__ = ["RewardFn", "load_callable"]
