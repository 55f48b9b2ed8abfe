"""TrainerGroup: `trainer.ranks` TrainerWorker actors as one trainer, seen from the driver.

The ranks are placed with a Ray placement group (one bundle each, packed onto as few nodes
as possible), join one process group at rank 0's node, and all receive every call: each step
they train on their share of the same batch (one copy in the object store), and collective
calls (ZeRO-3 gathers, checkpoints) run on all of them. Rank 0 answers.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlsys.types import SampleGroup


@ray.remote(num_cpus=0)
def _address() -> tuple[str, int]:
    from rlsys.trainer.engine import free_port

    return ray.util.get_node_ip_address(), free_port()


class TrainerGroup:
    def __init__(
        self,
        cfg: dict,
        model_path: str,
        critic_path: str | None = None,
        resources: dict[str, float] | None = None,
    ) -> None:
        """`resources`: of one rank; default `cluster.trainer_resources` of `cfg`."""
        from rlsys.rollout.pool import actor_options, bundle_of
        from rlsys.trainer.worker import TrainerWorker

        n = int(cfg["trainer"]["ranks"])
        bundle = bundle_of(resources or cfg["cluster"]["trainer_resources"])
        self.pg = placement_group([bundle] * n, strategy="PACK")
        ray.get(self.pg.ready())

        def on(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)

        master = ray.get(_address.options(scheduling_strategy=on(0)).remote())
        cls = ray.remote(TrainerWorker)
        self.ranks = [
            cls.options(**actor_options(bundle), scheduling_strategy=on(i)).remote(
                cfg, model_path, critic_path, i, n, master
            )
            for i in range(n)
        ]
        ray.get([r.ready.remote() for r in self.ranks])

    def _all(self, method: str, *args: Any) -> list:
        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])

    def train_step(self, groups: list[SampleGroup]) -> dict[str, Any]:
        """One update on every rank; rank 0's metrics (already summed over ranks)."""
        ref = ray.put(groups)
        return self._all("train_step", ref)[0]

    def weights_ref(self, dtype: str | None) -> ray.ObjectRef:
        """An object-store reference to the full weights (gathered by rank 0)."""
        refs = [r.get_weights.remote(dtype) for r in self.ranks]
        ray.get(refs[1:])  # the other ranks only take part in the gathers
        return refs[0]

    def weight_bytes(self, dtype: str) -> int:
        return ray.get(self.ranks[0].weight_bytes.remote(dtype))

    def save_pretrained(self, out_dir: str) -> str:
        return self._all("save_pretrained", out_dir)[0]

    def call(self, method: str, *args: Any) -> Any:
        """Any other TrainerWorker method, on every rank; rank 0's answer."""
        return self._all(method, *args)[0]

    def nodes(self) -> list[str]:
        """The Ray node id of each rank."""
        return ray.get([r.node_id.remote() for r in self.ranks])

    def kill(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.pg)
