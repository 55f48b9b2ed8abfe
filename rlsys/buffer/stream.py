"""StreamingBuffer: a Ray actor holding finished `SampleGroup`s between rollout and trainer.

Its unit is the prompt group. `put` appends finished groups as they complete; `get_batch`
hands the trainer the oldest `n` groups (first in, first out). Admission control, recycling of
partial groups and back-pressure come with the async issue; the on-policy loop needs only this.
"""

from __future__ import annotations

from collections import deque

from rlsys.types import SampleGroup


class StreamingBuffer:
    def __init__(self) -> None:
        self._groups: deque[SampleGroup] = deque()
        self._put = 0
        self._taken = 0

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

    def stats(self) -> dict[str, int]:
        return {
            "buffer/depth": len(self._groups),
            "buffer/put": self._put,
            "buffer/taken": self._taken,
        }
