"""Built-in verifiable tasks: name -> (split maker, reward function)."""

from rlsys.tasks import arithmetic

TASKS = {"arithmetic": arithmetic}

__all__ = ["TASKS"]
