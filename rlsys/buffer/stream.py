"""StreamingBuffer: a Ray actor holding finished `SampleGroup`s between rollout and trainer.

Its unit is the prompt group. `put` appends finished groups as they complete; `get_batch`
hands the trainer the oldest `n` groups (first in, first out). `recycle` keeps the unfinished
groups of a partial-rollout round; `take_recycled` serves them first-in-first-out ahead of new
prompts. `snapshot`/`restore` carry contents and counters through a checkpoint.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from rlsys.types import SampleGroup


class StreamingBuffer:
    def __init__(self) -> None:
        self._groups: deque[SampleGroup] = deque()
        self._recycled: deque[SampleGroup] = deque()
        self._put = 0
        self._taken = 0
        self._recycled_total = 0

    def put(self, groups: list[SampleGroup]) -> int:
        """Append finished groups; returns the depth after the put."""
        for g in groups:
            if any(s.reward is None for s in g.samples):
                raise ValueError(f"group {g.group_id} has unscored samples")
        self._groups.extend(groups)
        self._put += len(groups)
        return len(self._groups)

    def get_batch(self, n: int) -> list[SampleGroup]:
        """The oldest `n` groups, or an empty list if fewer than `n` are ready."""
        if len(self._groups) < n:
            return []
        self._taken += n
        return [self._groups.popleft() for _ in range(n)]

    def recycle(self, groups: list[SampleGroup]) -> int:
        """Keep unfinished groups (tokens, logprobs, versions intact) for a later round;
        returns how many are waiting."""
        self._recycled.extend(groups)
        self._recycled_total += len(groups)
        return len(self._recycled)

    def take_recycled(self, n: int) -> list[SampleGroup]:
        """Up to `n` recycled groups, oldest first."""
        return [self._recycled.popleft() for _ in range(min(n, len(self._recycled)))]

    def snapshot(self) -> dict[str, Any]:
        """Contents and counters, for a checkpoint (the groups are picklable records)."""
        return {
            "groups": list(self._groups),
            "recycled": list(self._recycled),
            "put": self._put,
            "taken": self._taken,
            "recycled_total": self._recycled_total,
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Replace contents and counters with a `snapshot()`; returns the depth."""
        self._groups = deque(state["groups"])
        self._recycled = deque(state.get("recycled", []))
        self._put, self._taken = int(state["put"]), int(state["taken"])
        self._recycled_total = int(state.get("recycled_total", 0))
        return len(self._groups)

    def stats(self) -> dict[str, int]:
        return {
            "buffer/depth": len(self._groups),
            "buffer/put": self._put,
            "buffer/taken": self._taken,
            "buffer/recycle_depth": len(self._recycled),
            "buffer/recycled": self._recycled_total,
        }
