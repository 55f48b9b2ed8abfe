"""RolloutWorker: turns prompts into scored `SampleGroup`s with the current policy weights.

Runs as a Ray actor. `generate` samples `n` responses per prompt, scores each with the
recipe's reward (errors are counted, the sample gets reward 0 and `reward_info["error"]`), and
returns finished groups. `update_weights` loads a new policy in place and bumps the version.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from rlsys.config import RecipeConfig, from_dict, rollout_device
from rlsys.data import Prompt
from rlsys.reward import RewardInput, build_scorer
from rlsys.rollout.hf import HFGenerator
from rlsys.types import Sample, SampleGroup, Status


def setup_actor_process(threads: int | None, device: str = "cpu", role: str = "") -> torch.device:
    """Threads, malloc settings and quiet libraries for a compute actor (Ray sets
    OMP_NUM_THREADS=1; `rlsys.allocator`: freed memory stays mapped for the next step).
    Returns the actor's torch device: for "cuda", the one GPU Ray gave the actor (the first
    visible one); `role` ("trainer" | "rollout") names the config key when there is none."""
    import transformers

    from rlsys.allocator import keep_freed_memory

    torch.set_num_threads(threads or os.cpu_count() or 1)
    keep_freed_memory()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if device != "cuda":
        return torch.device(device)
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{role}.device is cuda but this process sees no CUDA device: check "
            f"cluster.{role}_resources.GPU and the node's GPUs, or set {role}.device=cpu"
        )
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


class RolloutWorker:
    def __init__(self, cfg: dict, model_path: str, worker_id: int = 0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg: RecipeConfig = from_dict(cfg)
        # the controller resolves rollout_threads (`config.rollout_threads`) before it starts us
        threads = self.cfg.cluster.rollout_threads or self.cfg.cluster.threads_per_actor
        self.device = setup_actor_process(threads, rollout_device(self.cfg), "rollout")
        self.worker_id = worker_id
        dtype = getattr(torch, self.cfg.rollout.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.model.to(self.device)
        eos = self.model.generation_config.eos_token_id
        eos_ids = list(eos) if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.native = None  # a RolloutEngine (native or vllm): abort/continue, weights
        r = self.cfg.rollout
        context = self.cfg.data.max_prompt_tokens + r.max_new_tokens
        if r.agent.env is not None:  # a whole trajectory lives in one slot
            context += r.turns.max_total_tokens
        if r.engine == "native":
            from rlsys.rollout.native import NativeEngine

            ncfg = NativeEngine.Config(
                dtype=r.dtype, device=str(self.device), max_batch=r.max_batch, max_seq_len=context
            )
            self.native = NativeEngine.from_hf_model(self.model, self.tokenizer, ncfg)
        elif r.engine == "vllm":
            from rlsys.rollout.vllm import VLLMEngine

            vcfg = VLLMEngine.Config(
                dtype=r.dtype,
                max_batch=r.max_batch,
                max_seq_len=context,
                kv_cache_gib=r.vllm_kv_cache_gib,
                seed=self.cfg.seed + worker_id,
            )
            eos_known = [e for e in eos_ids if e is not None]
            self.native = VLLMEngine(model_path, config=vcfg, eos_token_ids=eos_known)
        if self.native is not None:
            from rlsys.rollout.batch import EngineGenerator

            self.engine = EngineGenerator(self.native)
            del self.model  # the engine holds its own copy of the weights
        else:
            self.engine = HFGenerator(self.model, [e for e in eos_ids if e is not None], pad or 0)
        self.scorer = build_scorer(self.cfg.reward, self.cfg.data.task)
        self.eos_ids = sorted(set(e for e in eos_ids if e is not None))
        self.agent = None
        if self.cfg.rollout.agent.env is not None:
            from rlsys.rollout.agent import AgentLoop

            self.agent = AgentLoop.from_config(
                self.cfg.rollout.agent,
                self.cfg.rollout.turns,
                self.tokenizer,
                self.cfg.rollout.max_new_tokens,
                seed=self.cfg.seed,
                stop_token_ids=self.eos_ids,
            )
        self.version = 0
        self.sync = None  # the weight-sync group, once joined

    def generate(
        self, prompts: list[Prompt], group_ids: list[int], seed: int, min_version: int = 0
    ) -> dict[str, Any]:
        """Sample, score and return `{"groups": [...], "stats": {...}}`."""
        self._check_version(min_version)
        r = self.cfg.rollout
        if self.agent is not None:
            return self._generate_multi_turn(prompts, group_ids, seed)
        t0 = time.perf_counter()
        gens = self.engine.generate(
            [p.prompt_ids for p in prompts],
            r.n_samples_per_prompt,
            r.max_new_tokens,
            r.temperature,
            r.top_p,
            seed,
        )
        if self.cfg.algorithm.advantage == "remax":
            # ReMax's baseline: one greedy response per prompt, scored, never trained on.
            greedy = self.engine.generate(
                [p.prompt_ids for p in prompts],
                1,
                r.max_new_tokens,
                r.temperature,
                1.0,
                seed,
                greedy=True,
            )
            gens = [g + b for g, b in zip(gens, greedy, strict=True)]
        gen_s = time.perf_counter() - t0
        groups, inputs = [], []
        n = r.n_samples_per_prompt
        for prompt, gid, group_gens in zip(prompts, group_ids, gens, strict=True):
            samples = []
            for j, g in enumerate(group_gens):
                s = Sample(group_id=gid, index=j, prompt_ids=list(prompt.prompt_ids))
                s.trainable = j < n
                s.meta = dict(prompt.meta)
                s.append(g.tokens, g.logprobs, self.version, trainable=True)
                s.finish(
                    Status.DONE if g.finished else Status.TRUNCATED,
                    "stop" if g.finished else "length",
                )
                s.turns = 1
                text = self.tokenizer.decode(g.tokens, skip_special_tokens=True)
                s.meta["response_text"] = text
                inputs.append(RewardInput(prompt.text, text, prompt.meta, s))
                samples.append(s)
            groups.append(SampleGroup(gid, samples, prompt.text))
        return self._score_groups(groups, inputs, gen_s)

    def generate_round(
        self,
        prompts: list[Prompt],
        group_ids: list[int],
        recycled: list[SampleGroup],
        want: int,
        seed: int,
        min_version: int = 0,
    ) -> dict[str, Any]:
        """A partial-rollout round (`rlsys/rollout/partial.py`): continue `recycled` groups
        first, start `prompts`, stop once `want` groups are complete and abort the rest.
        Returns `{"groups": scored complete groups, "partial": unfinished groups, "stats"}`."""
        from rlsys.rollout.engine import SamplingParams
        from rlsys.rollout.partial import run_round

        self._check_version(min_version)
        r = self.cfg.rollout
        t0 = time.perf_counter()
        new = []
        for prompt, gid in zip(prompts, group_ids, strict=True):
            samples = []
            for j in range(r.n_samples_per_prompt):
                sm = Sample(group_id=gid, index=j, prompt_ids=list(prompt.prompt_ids))
                sm.meta = dict(prompt.meta)
                sm.turns = 1
                samples.append(sm)
            new.append(SampleGroup(gid, samples, prompt.text))

        def params(sm: Sample, budget: int) -> SamplingParams:
            # A new group's samples share one request seed (the engine derives one stream per
            # sample from it); a continuation's seed depends on where the sample stands.
            key = (seed * 1_000_003 + sm.group_id) * 1_009
            if sm.response_ids:
                key += 1 + sm.index * 97 + len(sm.response_ids)
            return SamplingParams(
                temperature=r.temperature, top_p=r.top_p, seed=key, max_new_tokens=budget
            )

        res = run_round(self.native, [*recycled, *new], want, r.max_new_tokens, params)
        if res.errors:
            raise RuntimeError(f"rollout engine failed requests: {res.errors[:3]}")
        gen_s = time.perf_counter() - t0
        inputs = []
        for g in res.complete:
            for sm in g.samples:
                text = self.tokenizer.decode(sm.response_ids, skip_special_tokens=True)
                sm.meta["response_text"] = text
                inputs.append(RewardInput(g.prompt_text, text, sm.meta, sm))
        out = self._score_groups(res.complete, inputs, gen_s)
        out["partial"] = res.partial
        out["stats"].update(
            {
                "rollout/round_tokens": res.tokens,
                "rollout/round_tok_per_s": res.tokens / max(gen_s, 1e-9),
                "rollout/aborted_samples": res.aborted_samples,
                "rollout/recycled_groups": len(recycled),
            }
        )
        return out

    def _generate_multi_turn(
        self, prompts: list[Prompt], group_ids: list[int], seed: int
    ) -> dict[str, Any]:
        """Agent loop (`rollout.agent`): model turns alternate with env observations; the
        reward scores the final assistant turn (plus the env's step rewards)."""
        from rlsys.rollout.agent import agent_metrics, hf_generate_fn

        r = self.cfg.rollout
        assert self.agent is not None
        t0 = time.perf_counter()
        trajs, owners = [], []
        for prompt, gid in zip(prompts, group_ids, strict=True):
            for j in range(r.n_samples_per_prompt):
                s = Sample(group_id=gid, index=j, prompt_ids=list(prompt.prompt_ids))
                s.meta = dict(prompt.meta)
                trajs.append(self.agent.start(s, prompt.messages))
                owners.append(prompt)
        gen_fn = hf_generate_fn(self.engine, r.temperature, r.top_p)
        self.agent.run(trajs, gen_fn, version=self.version)
        gen_s = time.perf_counter() - t0
        groups: dict[int, SampleGroup] = {}
        inputs = []
        for t, prompt in zip(trajs, owners, strict=True):
            s = t.sample
            s.meta["response_text"] = t.final_response
            s.meta["env_reward"] = t.env_reward
            inputs.append(RewardInput(prompt.text, t.final_response, prompt.meta, s))
            groups.setdefault(s.group_id, SampleGroup(s.group_id, [], prompt.text)).samples.append(
                s
            )
        out = self._score_groups(list(groups.values()), inputs, gen_s)
        for g in out["groups"]:
            for s in g.samples:
                s.reward += float(s.meta.get("env_reward", 0.0))
        out["stats"].update(agent_metrics(trajs))
        return out

    def _score_groups(
        self, groups: list[SampleGroup], inputs: list, gen_s: float
    ) -> dict[str, Any]:
        """Score every sample in one concurrent call; apply on_error and overlong shaping."""
        r = self.cfg.rollout
        t1 = time.perf_counter()
        outcomes = self.scorer.score(inputs)  # concurrent; raises only with on_error: raise
        skipped_groups = set()
        for inp, o in zip(inputs, outcomes, strict=True):
            s = inp.sample
            if o.score is None:  # on_error: skip
                skipped_groups.add(s.group_id)
                continue
            s.reward, s.reward_info = float(o.score), dict(o.parts)
            if o.error:
                s.reward_info["error"] = 1.0
            if self.cfg.algorithm.overlong.enabled:
                pen = overlong_penalty(
                    len(s.response_ids), r.max_new_tokens, self.cfg.algorithm.overlong
                )
                s.reward += pen
                s.reward_info["overlong"] = pen
        # Group estimators need whole groups: a skipped sample drops its group.
        groups = [g for g in groups if g.group_id not in skipped_groups]
        n_tok = sum(len(s.response_ids) for g in groups for s in g.samples)
        stats: dict[str, Any] = {
            "rollout/gen_s": gen_s,
            "rollout/tokens": n_tok,
            "rollout/tok_per_s": n_tok / max(gen_s, 1e-9),
            "reward/score_s": time.perf_counter() - t1,
            "reward/skipped_groups": len(skipped_groups),
        }
        stats.update(self.scorer.take_stats())
        return {"groups": groups, "stats": stats}

    def evaluate(
        self, prompts: list[Prompt], k: int, seed: int, min_version: int = 0
    ) -> dict[str, float]:
        """Greedy accuracy and pass@k / mean@k (k samples at the rollout temperature) on
        `prompts`. A response counts as solved when its reward >= `eval.solve_threshold`."""
        self._check_version(min_version)
        r, ev = self.cfg.rollout, self.cfg.eval
        max_new = ev.max_new_tokens or r.max_new_tokens
        ids = [p.prompt_ids for p in prompts]
        out: dict[str, float] = {}
        greedy = self.engine.generate(ids, 1, max_new, r.temperature, 1.0, seed, greedy=True)
        scores = self._scores(prompts, [g[0] for g in greedy])
        out["eval/greedy_reward"] = sum(scores) / len(scores)
        out["eval/greedy_acc"] = sum(x >= ev.solve_threshold for x in scores) / len(scores)
        if k > 1:
            gens = self.engine.generate(ids, k, max_new, r.temperature, r.top_p, seed)
            flat = self._scores(
                [p for p in prompts for _ in range(k)], [g for gr in gens for g in gr]
            )
            solved = [
                [x >= ev.solve_threshold for x in flat[i * k : (i + 1) * k]]
                for i in range(len(prompts))
            ]
            # With n = k samples the unbiased pass@k estimator 1 - C(n-c, k)/C(n, k) is 1[c > 0].
            out[f"eval/pass@{k}"] = sum(any(s) for s in solved) / len(solved)
            out[f"eval/mean@{k}"] = sum(sum(s) / k for s in solved) / len(solved)
        out["eval/prompts"] = float(len(prompts))
        return out

    def _scores(self, prompts: list[Prompt], gens: list) -> list[float]:
        """Reward of each generation (0 for errors and skips) in one concurrent call."""
        inputs = [
            RewardInput(
                p.text, self.tokenizer.decode(g.tokens, skip_special_tokens=True), p.meta, None
            )
            for p, g in zip(prompts, gens, strict=True)
        ]
        return [o.score or 0.0 for o in self.scorer.score(inputs)]

    def update_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Load new policy weights in place; returns the new version."""
        if self.native is not None:
            self.native.update_weights(state, version)
            self.version = version
            return version
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _TIED]
        if missing or unexpected:
            raise ValueError(f"weight update mismatch: missing={missing} unexpected={unexpected}")
        self.version = version
        return version

    def get_version(self) -> int:
        return self.version

    def _check_version(self, min_version: int) -> None:
        """A call needs weights of at least `min_version`; a worker Ray restarted since the
        last push holds the initial checkpoint and must be brought up to date first."""
        if self.version < min_version:
            from rlsys.rollout.pool import StaleWorkerError

            raise StaleWorkerError(
                f"rollout worker {self.worker_id} holds version {self.version}, the call "
                f"needs {min_version} (restarted?)"
            )

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The engine's current weights by Hugging Face name (copies)."""
        if self.native is not None:
            return self.native.named_weights()
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def sync_join(
        self,
        addr: str,
        port: int,
        rank: int,
        world: int,
        timeout_s: float = 300,
        backend: str = "gloo",
    ) -> None:
        """Join the trainer's weight-sync group as receiver `rank` (rlsys/weight_sync.py)."""
        from rlsys.weight_sync import SyncMember

        self.sync = None  # drop a previous group first
        self.sync = SyncMember(addr, port, rank, world, timeout_s, backend)

    def sync_shm_load(self, plan: list, dtype: str, path: str, version: int) -> int:
        """Load the weights the trainer wrote to the shared-memory file `path`; the version."""
        from rlsys.weight_sync import SharedWeights

        shm = getattr(self, "_shm", None)
        if shm is None or shm.path != path:
            shm = self._shm = SharedWeights(path, plan, getattr(torch, dtype))
        from rlsys.rollout.native import NativeEngine

        if isinstance(self.native, NativeEngine):  # the writer checked finiteness
            self.native.update_weights(shm.views(), version, finite_checked=True)
        else:
            self._load(shm.views(), version, whole=True)
        self.version = version
        return version

    def _load(self, views, version: int, whole: bool = False) -> None:
        """Copy the weights (`whole`) or one bucket of them into the engine in place."""
        if self.native is not None:
            self.native.update_weights(views, version, partial=not whole)
            return
        _, unexpected = self.model.load_state_dict(views, strict=False)
        if unexpected:
            raise ValueError(f"weight update: unexpected tensors {unexpected}")

    def sync_recv(self, plan: list, dtype: str, version: int) -> int:
        """Receive a broadcast push bucket by bucket, loading each in place; the new version."""
        if self.sync is None:
            from rlsys.rollout.pool import StaleWorkerError

            raise StaleWorkerError(
                f"rollout worker {self.worker_id} is in no sync group (restarted?)"
            )
        self.sync.recv(plan, getattr(torch, dtype), lambda views: self._load(views, version))
        self.version = version
        return version


_TIED = {"lm_head.weight"}


def overlong_penalty(length: int, max_len: int, cfg) -> float:
    """DAPO's soft overlong penalty for `algorithm.overlong` (see `soft_overlong`)."""
    from rlsys.reward.builtin import soft_overlong

    return soft_overlong(length, max_len, cfg.buffer, cfg.penalty)
