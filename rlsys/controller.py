"""The controller: builds the actors from a recipe and runs the training loop.

```
   prompts ──► RolloutWorker ×R ──groups──► StreamingBuffer ──batch──► TrainerWorker
                    ▲   (generate, reward)       (FIFO of groups)      (GRPO update, v+1)
                    └──────────────── weights, version v+1 (object store) ◄───┘
```

On-policy loop (`max_staleness` 0, the only mode until the async issue lands), per step:

1. `generate`: each rollout worker gets its share of `prompts_per_step` prompts and returns
   scored groups. Waits for: the slowest worker. Trainer is idle meanwhile.
2. `put` the groups into the buffer, `get_batch(prompts_per_step)` them back out.
3. `train_step`: advantages, loss, optimizer step. Rollout is idle meanwhile.
4. `push_weights`: every rollout worker loads version v+1 before the next step starts.

All compute actors use every core (`cluster.threads_per_actor`): on-policy, the roles take turns.
"""

from __future__ import annotations

import os
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rlsys.config import ConfigError, RecipeConfig, to_dict, to_yaml


def make_run_dir(cfg: RecipeConfig, recipe_path: str | None) -> Path:
    if cfg.logging.run_dir:
        d = Path(cfg.logging.run_dir)
    else:
        stem = Path(recipe_path).stem if recipe_path else cfg.name
        d = Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _init_ray(cfg: RecipeConfig) -> bool:
    """Start (or join) Ray; True when this call started it and so must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in ("RLSYS_CACHE", "HF_HOME") if k in os.environ}
    env.update(TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu")
    kwargs: dict[str, Any] = dict(
        include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env}
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ncpu = cfg.cluster.num_cpus or max(os.cpu_count() or 1, 2)
        ray.init(num_cpus=ncpu, **kwargs)
    return True


def train(cfg: RecipeConfig, recipe_path: str | None = None) -> dict[str, Any]:
    """Run a recipe to completion; returns a summary (run dir, checkpoint, rewards)."""
    import ray
    from transformers import AutoTokenizer

    from rlsys import models
    from rlsys.data import PromptStream, load_splits
    from rlsys.logging import RunLogger
    from rlsys.reward.config import resolve_paths, validate_reward_config

    # Everything that can fail on user input fails here, before any actor starts.
    validate_reward_config(cfg.reward, cfg.data.task)
    cfg.reward = resolve_paths(cfg.reward)  # actors may run in another working directory
    model_path = models.resolve(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_prompts, eval_prompts = load_splits(cfg.data, tokenizer, cfg.seed)
    if cfg.eval.every and not eval_prompts:
        raise ConfigError("eval.every is set but there is no held-out split: set data.eval_path")
    eval_prompts = eval_prompts[: cfg.eval.num_prompts]
    stream = PromptStream(train_prompts, cfg.seed)

    run_dir = make_run_dir(cfg, recipe_path)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = RunLogger(run_dir, cfg.steps, to_dict(cfg), cfg.logging.wandb)
    logger.info(f"run dir: {run_dir}  model: {model_path}")

    started = _init_ray(cfg)
    try:
        return _run(cfg, model_path, run_dir, logger, stream, eval_prompts)
    finally:
        if started:
            ray.shutdown()


def _run(cfg: RecipeConfig, model_path: str, run_dir, logger, stream, eval_prompts) -> dict:
    """The actor part of `train`: start rollout workers, trainer and buffer; run the steps."""
    import ray

    from rlsys import models
    from rlsys.buffer.stream import StreamingBuffer
    from rlsys.rollout.worker import RolloutWorker
    from rlsys.trainer.worker import TrainerWorker
    from rlsys.weight_sync import push_weights

    cfg_d = to_dict(cfg)
    r = cfg.rollout
    rollout_cls = ray.remote(num_cpus=1)(RolloutWorker)
    workers = [rollout_cls.remote(cfg_d, model_path, i) for i in range(r.workers)]
    critic_path = models.resolve(cfg.algorithm.critic.path) if cfg.algorithm.critic.path else None
    trainer = ray.remote(num_cpus=1)(TrainerWorker).remote(cfg_d, model_path, critic_path)
    buffer = ray.remote(num_cpus=0)(StreamingBuffer).remote()
    nbytes = ray.get(trainer.weight_bytes.remote(r.dtype))
    # The rollout workers load the same checkpoint; from step 1 on they get pushed weights.
    ray.get([w.get_version.remote() for w in workers])

    summary: dict[str, Any] = {"run_dir": str(run_dir), "rewards": []}
    version, next_group = 0, 0
    try:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            groups, outs, ds = _collect_groups(cfg, stream, workers, buffer, step, next_group)
            next_group += ds.pop("groups_started")
            t_gen = time.perf_counter() - t0
            t1 = time.perf_counter()
            train_m = ray.get(trainer.train_step.remote(groups))
            t_train = time.perf_counter() - t1
            version += 1
            sync_m = push_weights(trainer, workers, version, r.dtype, nbytes)
            metrics = _step_metrics(groups, outs)
            metrics.update(ds)
            metrics.update(train_m)
            metrics.update(sync_m)
            metrics.update(ray.get(buffer.stats.remote()))
            metrics["perf/rollout_s"] = t_gen
            metrics["perf/train_s"] = t_train
            metrics["perf/step_s"] = time.perf_counter() - t0
            if "reward/first_error" in metrics:
                logger.info(f"[yellow]reward error (first seen): {metrics['reward/first_error']}")
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.steps):
                seed = cfg.seed + 7919
                metrics.update(ray.get(workers[0].evaluate.remote(eval_prompts, cfg.eval.k, seed)))
            hists = {
                "reward/hist": [float(s.reward) for g in groups for s in g.samples if s.trainable],
                "rollout/length_hist": [
                    float(len(s.response_ids)) for g in groups for s in g.samples
                ],
            }
            logger.log(step, metrics, hists)
            every = cfg.logging.samples_every
            if every and (step % every == 0 or step == 1):
                logger.log_samples(
                    step, _sample_rows(groups, version, cfg.logging.samples_per_table)
                )
            summary["rewards"].append(metrics["reward/mean"])
        final = run_dir / "final"
        ray.get(trainer.save_pretrained.remote(str(final)))
        summary["checkpoint"] = str(final)
        logger.info(f"saved policy (Hugging Face format): {final}")
    except KeyboardInterrupt:
        out = run_dir / "interrupted"
        logger.info(f"interrupted: saving the current policy to {out}")
        ray.get(trainer.save_pretrained.remote(str(out)))
        summary["checkpoint"] = str(out)
        raise
    finally:
        plot = logger.finish(cfg.logging.plot)
        if plot:
            summary["plot"] = str(plot)
            logger.info(f"plot: {plot}")
        for a in [*workers, trainer, buffer]:
            ray.kill(a)
    return summary


def _collect_groups(
    cfg: RecipeConfig, stream, workers: list, buffer, step: int, next_group: int
) -> tuple[list, list[dict], dict[str, Any]]:
    """Generate one batch of scored groups through the buffer.

    With DAPO dynamic sampling, groups whose trainable rewards are all equal carry no GRPO
    signal and are dropped; up to `max_rounds` extra rounds refill the batch, after which the
    step trains on what it has (at least one group, else on the unfiltered last round)."""
    import ray

    r, ds_cfg = cfg.rollout, cfg.algorithm.dynamic_sampling
    want, started, dropped, outs = r.prompts_per_step, 0, 0, []
    rounds = 1 + (ds_cfg.max_rounds if ds_cfg.enabled else 0)
    last: list = []
    for rnd in range(rounds):
        depth = ray.get(buffer.stats.remote())["buffer/depth"]
        need = want - depth
        if need <= 0:
            break
        prompts = stream.next(need)
        gids = list(range(next_group + started, next_group + started + len(prompts)))
        started += len(prompts)
        shares = [(prompts[i :: r.workers], gids[i :: r.workers]) for i in range(r.workers)]
        seed = cfg.seed * 1_000_003 + step * 101 + rnd * 17
        round_outs = ray.get(
            [
                w.generate.remote(p, g, seed + i)
                for i, (w, (p, g)) in enumerate(zip(workers, shares, strict=True))
                if p
            ]
        )
        outs += round_outs
        last = [g for o in round_outs for g in o["groups"]]
        keep = last
        if ds_cfg.enabled:
            keep = [g for g in last if len({s.reward for s in g.samples if s.trainable}) > 1]
            dropped += len(last) - len(keep)
        ray.get(buffer.put.remote(keep))
    depth = ray.get(buffer.stats.remote())["buffer/depth"]
    if depth == 0:  # every group was uniform: train on the last round rather than stall
        ray.get(buffer.put.remote(last))
        depth = len(last)
    groups = ray.get(buffer.get_batch.remote(min(want, depth)))
    stats = {"groups_started": started}
    if ds_cfg.enabled:
        stats.update({"rollout/dropped_groups": dropped, "rollout/groups_trained": len(groups)})
    return groups, outs, stats


def _sample_rows(groups: list, version: int, n: int) -> list[dict[str, Any]]:
    """Rows for the samples table: prompt, response, reward parts, length, staleness."""
    rows = []
    for g in groups:
        for s in g.samples:
            if len(rows) >= n:
                return rows
            rows.append(
                {
                    "group": g.group_id,
                    "prompt": g.prompt_text,
                    "response": s.meta.get("response_text", ""),
                    "reward": float(s.reward),
                    "parts": dict(s.reward_info),
                    "length": len(s.response_ids),
                    "staleness": version - 1 - min(s.versions, default=version - 1),
                    "trainable": s.trainable,
                }
            )
    return rows


def _step_metrics(groups: list, outs: list[dict]) -> dict[str, Any]:
    """`reward/*` and `rollout/*` summaries of one step's groups."""
    samples = [s for g in groups for s in g.samples if s.trainable]
    greedy = [float(s.reward) for g in groups for s in g.samples if not s.trainable]
    rewards = [float(s.reward) for s in samples]
    lengths = [len(s.response_ids) for s in samples]
    gen_s = max(o["stats"]["rollout/gen_s"] for o in outs)
    n_tok = sum(o["stats"]["rollout/tokens"] for o in outs)
    m: dict[str, Any] = {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        **{
            k: sum(o["stats"].get(k, 0) for o in outs)
            for k in ("reward/errors", "reward/timeouts", "reward/skipped", "reward/skipped_groups")
        },
        "reward/uniform_group_frac": statistics.fmean(
            float(len({s.reward for s in g.samples if s.trainable}) == 1) for g in groups
        ),
        "rollout/response_len_mean": statistics.fmean(lengths),
        "rollout/response_len_max": max(lengths),
        "rollout/truncated_frac": statistics.fmean(
            float(s.stop_reason == "length") for s in samples
        ),
        "rollout/tokens": n_tok,
        "rollout/tok_per_s": n_tok / max(gen_s, 1e-9),
    }
    if greedy:
        m["reward/greedy_mean"] = statistics.fmean(greedy)
    agent_keys = {k for o in outs for k in o["stats"] if k.startswith("rollout/agent/")}
    for k in sorted(agent_keys):  # multi-turn: averaged over workers and rounds
        m[k] = statistics.fmean(o["stats"][k] for o in outs if k in o["stats"])
    parts: dict[str, list[float]] = {}
    for s in samples:
        for k, v in s.reward_info.items():
            parts.setdefault(k, []).append(v)
    for k, vs in parts.items():
        m[f"reward/{k}"] = statistics.fmean(vs)
    for o in outs:
        if "reward/first_error" in o["stats"]:
            m["reward/first_error"] = o["stats"]["reward/first_error"]
            break
    return m
