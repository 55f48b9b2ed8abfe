"""Built-in verifiable tasks: name -> (split maker, reward function)."""

from rlsys.tasks import arithmetic, tool_arithmetic

TASKS = {"arithmetic": arithmetic, "tool_arithmetic": tool_arithmetic}

__all__ = ["TASKS"]
