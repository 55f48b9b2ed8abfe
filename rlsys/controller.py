"""The controller: builds the actors from a recipe and runs the training loop.

```
   prompts ──► RolloutWorker ×R ──groups──► StreamingBuffer ──batch──► TrainerGroup (×N ranks)
                    ▲   (generate, reward)       (FIFO of groups)    (advantages, loss, v+1)
                    └──── weights v+1 (`weight_sync.py`: /dev/shm or bucketed broadcast) ◄──┘
```

Per step (`rollout.mode: sync`, on-policy):

1. Collect a batch of scored groups through the buffer: each rollout worker gets its share of
   `prompts_per_step` prompts (`_collect_groups`), or, with `rollout.partial.enabled`,
   `over_provision` x more, recycled ones first, and the unfinished rest goes back to the
   buffer's recycle queue (`_collect_partial`, APRIL). The trainer is idle meanwhile.
2. `train_step`: old/reference logprobs, values, advantages, `trainer.mini_batches` updates.
   The rollout workers are idle meanwhile.
3. Push version v+1 to every rollout worker before the next step (`WeightSync.push`).

With `rollout.mode: async` an `AsyncScheduler` (`rollout/scheduler.py`) keeps the workers
generating while the trainer updates; admission bounds each sample to at most
`rollout.max_staleness` versions behind the policy that trains on it.

Checkpoints (`trainer/checkpoint.py`): after every `checkpoint.every`-th step, the last step
and on Ctrl-C, the trainer's and the driver's state (prompt position, group counter, buffer,
W&B id) go to `<run dir>/checkpoints/step-N`; `resume=auto` rebuilds the actors from the
latest one before the loop and continues with step N + 1. Rollout seeds derive from (recipe
seed, step, round) and group ids from the saved counter, so a resumed run samples what the
uninterrupted one would have.

All compute actors use every core (`cluster.threads_per_actor`): on-policy, the roles take turns.
In async mode on one node the rollout workers default to one thread each
(`cluster.rollout_threads`), so that the trainer keeps its speed while they generate beside it.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsys.config import (
    ConfigError,
    RecipeConfig,
    rollout_device,
    rollout_threads,
    to_dict,
    to_yaml,
    trainer_device,
)

if TYPE_CHECKING:
    from rlsys.rollout.pool import RolloutPool
    from rlsys.trainer.checkpoint import Resume


def run_dir_for(cfg: RecipeConfig, recipe_path: str | None, resumed: Resume | None) -> Path:
    """`logging.run_dir`; else the resumed checkpoint's run folder; else a new
    `runs/<recipe file stem>-<timestamp>`."""
    if cfg.logging.run_dir:
        return Path(cfg.logging.run_dir)
    if resumed is not None:  # continue the checkpoint's run folder
        return Path(resumed.state["run_dir"])
    stem = Path(recipe_path).stem if recipe_path else cfg.name
    d = Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    n = 2
    while d.exists():  # two runs started within one second
        d, n = d.with_name(f"{stem}-{datetime.now():%Y%m%d-%H%M%S}-{n}"), n + 1
    return d


def check_run_dir(cfg: RecipeConfig, d: Path) -> None:
    """ConfigError when the run folder `d` cannot be used: a file is there, or it already
    holds a run and this one is fresh (`resume` empty): that would replace its metrics and
    checkpoints."""
    if d.exists() and not d.is_dir():
        raise ConfigError(f"logging.run_dir: {d} is a file; pick a folder")
    if not cfg.resume and (d / "metrics.jsonl").exists():
        raise ConfigError(
            f"logging.run_dir: {d} already holds a run; continue it with resume=auto, or "
            "pick a new logging.run_dir"
        )


def make_run_dir(d: Path) -> Path:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the run folder {d} ({e.strerror}): set logging.run_dir"
        ) from None
    return d


def _already_done(cfg: RecipeConfig, recipe_path: str | None, resumed: Resume | None) -> str | None:
    """The message for a resume whose checkpoint is at (or past) the recipe's last step and
    whose final policy exists: nothing to train. None otherwise (a checkpoint at the last
    step without `final/` is a run cut off before its export: resuming writes it)."""
    if resumed is None or resumed.step < cfg.steps:
        return None
    final = run_dir_for(cfg, recipe_path, resumed) / "final"
    if not (final / "config.json").is_file():
        return None
    return (
        f"nothing to train: {resumed.path} is at step {resumed.step} and the recipe has "
        f"steps={cfg.steps}; the final policy is in {final}. Raise steps (e.g. "
        f"steps={resumed.step + cfg.steps}) to train further."
    )


def _connect_check(address: str) -> None:
    """Fail fast (ConfigError) when `cluster.address` names a host:port nobody listens on:
    `ray.init` would retry for minutes."""
    import socket

    if address == "auto" or address.startswith("local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not port.isdigit() or "/" in hostport:
        raise ConfigError(
            f"cluster.address: '{address}' is not host:port (e.g. 10.0.0.1:6379, what "
            "`ray start --head` prints; or ray://host:10001, or auto)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"cluster.address: nothing answers at {hostport} ({e.strerror or e}); start the "
            "head with `ray start --head` there, or fix the address"
        ) from None


def _init_ray(cfg: RecipeConfig) -> bool:
    """Start (or join) Ray; True when this call started it and so must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in ("RLSYS_CACHE", "HF_HOME") if k in os.environ}
    env.update(TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled")
    kwargs: dict[str, Any] = dict(
        include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env}
    )
    if address:
        _connect_check(address)
        try:
            ray.init(address=address, **kwargs)
        except (ValueError, ConnectionError) as e:
            raise ConfigError(f"cluster.address={address}: {e}") from None
    else:
        # Logical CPUs: one per actor at least (threads are set per actor, not by Ray).
        cl = cfg.cluster
        need = math.ceil(
            cfg.rollout.workers * cl.rollout_resources.get("CPU", 0)
            + cfg.trainer.ranks * cl.trainer_resources.get("CPU", 0)
        )
        ncpu = cfg.cluster.num_cpus or max(os.cpu_count() or 1, need)
        ray.init(num_cpus=ncpu, **kwargs)
    return True


def cluster_shortfall(cfg: RecipeConfig) -> str | None:
    """What the Ray cluster lacks, in total, of the resources the rollout workers and trainer
    ranks ask for (`cluster.*_resources`), as a message; None when it has enough. Their
    placement groups would wait for it forever."""
    import ray

    cl, have = cfg.cluster, ray.cluster_resources()
    need: dict[str, float] = {}
    for n, res in (
        (cfg.rollout.workers, cl.rollout_resources),
        (cfg.trainer.ranks, cl.trainer_resources),
    ):
        for k, v in res.items():
            need[k] = need.get(k, 0.0) + n * v
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return None
    ask = ", ".join(f"{k} {v:g} (has {have.get(k, 0.0):g})" for k, v in sorted(short.items()))
    return (
        f"the Ray cluster cannot place the actors: they need {ask} in all "
        f"(rollout.workers={cfg.rollout.workers} x cluster.rollout_resources + "
        f"trainer.ranks={cfg.trainer.ranks} x cluster.trainer_resources); lower them, raise "
        "cluster.num_cpus, or add nodes"
    )


def train(cfg: RecipeConfig, recipe_path: str | None = None) -> dict[str, Any]:
    """Run a recipe to completion; returns a summary (run dir, checkpoint, rewards)."""
    import ray
    from transformers import AutoTokenizer

    from rlsys import models
    from rlsys.data import PromptStream, load_splits
    from rlsys.logging import RunLogger
    from rlsys.reward.config import resolve_paths, validate_reward_config
    from rlsys.rollout.agent import check_agent
    from rlsys.trainer import checkpoint

    # Everything that can fail on user input fails here, before any actor starts.
    validate_reward_config(cfg.reward, cfg.data.task)
    cfg.reward = resolve_paths(cfg.reward)  # actors may run in another working directory
    check_agent(cfg.rollout.agent)
    model_path = models.resolve(cfg.model.path)
    if cfg.rollout.engine == "native":
        from rlsys.rollout.native import check_supported

        check_supported(model_path, cfg.model.path)
    if cfg.trainer.lora.rank:
        from rlsys.trainer.lora import check_targets

        check_targets(model_path, cfg.trainer.lora.targets)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_prompts, eval_prompts = load_splits(cfg.data, tokenizer, cfg.seed)
    if cfg.eval.every and not eval_prompts:
        raise ConfigError("eval.every is set but there is no held-out split: set data.eval_path")
    eval_prompts = eval_prompts[: cfg.eval.num_prompts]
    stream = PromptStream(train_prompts, cfg.seed)
    fp = checkpoint.fingerprint(cfg, model_path)
    resumed = checkpoint.prepare_resume(cfg, recipe_path, fp)  # validated, or CheckpointError
    done = _already_done(cfg, recipe_path, resumed)
    if done is not None:
        print(done)
        final = run_dir_for(cfg, recipe_path, resumed) / "final"
        return {"run_dir": str(final.parent), "checkpoint": str(final), "rewards": []}

    run_dir = run_dir_for(cfg, recipe_path, resumed)
    check_run_dir(cfg, run_dir)

    started = _init_ray(cfg)
    try:
        short = cluster_shortfall(cfg)
        if short and started:  # a local cluster this run started: its size is fixed
            raise ConfigError(short)
        make_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        logger = RunLogger(
            run_dir,
            cfg.steps,
            to_dict(cfg),
            cfg.logging.wandb,
            resume_step=resumed.step if resumed else None,
            wandb_id=resumed.state.get("wandb_id") if resumed else None,
        )
        logger.info(f"run dir: {run_dir}  model: {model_path}")
        if cfg.resume == "auto" and resumed is None:
            logger.info("resume=auto: no checkpoint found, starting a fresh run")
        if short:  # a joined cluster may still grow (autoscaler, `ray start` elsewhere)
            logger.info(f"[yellow]waiting for nodes: {short}")
        return _run(cfg, model_path, run_dir, logger, stream, eval_prompts, fp, resumed)
    finally:
        if started:
            ray.shutdown()


def _run(
    cfg: RecipeConfig,
    model_path: str,
    run_dir,
    logger,
    stream,
    eval_prompts,
    fp: dict | None = None,
    resumed: Resume | None = None,
) -> dict:
    """The actor part of `train`: start rollout workers, trainer and buffer; restore them from
    `resumed` (a `checkpoint.Resume`) if given; run the steps, checkpointing every
    `checkpoint.every` and on Ctrl-C."""
    import ray

    from rlsys import models
    from rlsys.buffer.stream import StreamingBuffer
    from rlsys.rollout.pool import Call, RolloutPool
    from rlsys.trainer.group import TrainerGroup
    from rlsys.weight_sync import WeightSync, broadcast_backend

    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    cfg.cluster.rollout_threads = rollout_threads(cfg, nodes)
    logger.info(
        f"torch threads: trainer {cfg.cluster.threads_per_actor or 'all cores'}, "
        f"rollout workers {cfg.cluster.rollout_threads or 'all cores'} each ({nodes} node(s))"
    )
    devices = (trainer_device(cfg), rollout_device(cfg))
    gpus = sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"])
    logger.info(f"devices: trainer {devices[0]}, rollout workers {devices[1]}")
    if gpus and "cuda" not in devices:
        logger.info(
            f"[yellow]the Ray cluster has {gpus:g} GPU(s) and no role uses one: give them "
            "to the roles with cluster.trainer_resources / cluster.rollout_resources "
            "(e.g. '{CPU: 4, GPU: 1}')"
        )
    cfg_d = to_dict(cfg)
    r = cfg.rollout
    workers = RolloutPool(cfg_d, model_path, r.workers)
    critic_path = models.resolve(cfg.algorithm.critic.path) if cfg.algorithm.critic.path else None
    trainer = TrainerGroup(cfg_d, model_path, critic_path)
    buffer = ray.remote(num_cpus=0)(StreamingBuffer).remote()
    # The rollout workers load the same checkpoint; from step 1 on they get pushed weights.
    workers.ready()
    backend = broadcast_backend(*devices)
    sync = WeightSync(
        trainer, workers, r.dtype, cfg.sync.bucket_mb, cfg.sync.method, cfg.sync.timeout_s, backend
    )

    summary: dict[str, Any] = {"run_dir": str(run_dir), "rewards": [], "group_ids": []}
    summary["nodes"] = {"rollout": workers.nodes(), "trainer": trainer.nodes()}
    version, next_group, first = 0, 0, 1

    def on_restart(i: int) -> None:
        """A rollout worker came back with the initial checkpoint: the current policy."""
        if version:
            ref = trainer.weights_ref(r.dtype)
            ray.get(workers.workers[i].update_weights.remote(ref, version))
        sync.invalidate()
        logger.info(f"[yellow]rollout worker {i} restarted; loaded weights v{version}")

    workers.on_restart = on_restart
    done = saved = None  # the state after the last finished step; the last checkpoint's step
    if resumed is not None:
        done = _restore(resumed, trainer, buffer, stream, sync)
        version, next_group, first = done["version"], done["next_group"], done["step"] + 1
        saved = done["step"]
        logger.info(f"resumed from {resumed.path}; next step {first}")
    sched, busy = None, 0.0
    if r.mode == "async":
        from rlsys.rollout.scheduler import AsyncScheduler

        sched = AsyncScheduler(cfg, stream, workers, trainer, next_group)
    try:
        for step in range(first, cfg.steps + 1):
            t0 = time.perf_counter()
            if sched is not None:
                groups, outs, ds = sched.next_batch(step, version)
            elif r.partial.enabled:
                groups, outs, ds = _collect_partial(
                    cfg, stream, workers, buffer, step, next_group, version
                )
            else:
                groups, outs, ds = _collect_groups(
                    cfg, stream, workers, buffer, step, next_group, version
                )
            next_group += ds.pop("groups_started")
            t_gen = time.perf_counter() - t0
            t1 = time.perf_counter()
            try:
                train_m = trainer.train_step(groups)
            except FloatingPointError as e:  # the trainer's, carried by a RayTaskError
                raise TrainingFailed(_failure(cfg, run_dir, step, e, saved)) from None
            t_train = time.perf_counter() - t1
            version += 1
            sync_m = sched.push(version) if sched is not None else sync.push(version)
            metrics = _step_metrics(groups, outs)
            metrics.update(ds)
            metrics.update(train_m)
            metrics.update(sync_m)
            metrics.update(ray.get(buffer.stats.remote()))
            metrics.update(workers.stats())
            metrics["perf/rollout_s"] = t_gen
            metrics["perf/train_s"] = t_train
            metrics["perf/step_s"] = time.perf_counter() - t0
            if sched is not None:
                busy += sum(
                    o["stats"]["rollout/gen_s"] + o["stats"]["reward/score_s"] for o in outs
                )
                metrics.update(sched.idle(busy))
            if "reward/first_error" in metrics:
                logger.info(f"[yellow]reward error (first seen): {metrics['reward/first_error']}")
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.steps):
                seed = cfg.seed + 7919
                args = (eval_prompts, cfg.eval.k, seed, version)
                metrics.update(workers.call([Call(0, "evaluate", args)])[0])
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
            summary["group_ids"].append([g.group_id for g in groups])
            every = cfg.checkpoint.every
            if every:
                done = _step_state(step, version, next_group, stream, buffer)
                if step % every == 0 or step == cfg.steps:
                    _save_checkpoint(cfg, run_dir, fp, trainer, logger, done)
                    saved = step
        if sched is not None:
            sched.close()
        final = run_dir / "final"
        trainer.save_pretrained(str(final))
        summary["checkpoint"] = str(final)
        logger.info(f"saved policy (Hugging Face format): {final}")
    except KeyboardInterrupt:
        if cfg.checkpoint.every and done is not None and saved != done["step"]:
            try:
                _save_checkpoint(cfg, run_dir, fp, trainer, logger, done)
            except ConfigError as e:  # Ctrl-C landed inside the trainer update
                logger.info(f"[yellow]{e}")
        out = run_dir / "interrupted"
        logger.info(f"interrupted: saving the current policy to {out}")
        trainer.save_pretrained(str(out))
        summary["checkpoint"] = str(out)
        raise
    finally:
        plot = logger.finish(cfg.logging.plot)
        if plot:
            summary["plot"] = str(plot)
            logger.info(f"plot: {plot}")
        sync.close()
        trainer.kill()
        workers.kill()
        ray.kill(buffer)
    return summary


class TrainingFailed(RuntimeError):
    """The trainer could not take a step (a non-finite loss or gradient norm: the update was
    skipped). The run stops; what it logged and checkpointed stays."""


def _failure(cfg: RecipeConfig, run_dir, step: int, err: Exception, saved: int | None) -> str:
    """One message: the step, the trainer's reason, and where the run can go on from."""
    from rlsys.trainer import checkpoint

    cause = getattr(err, "cause", None) or err  # RayTaskError keeps the actor's exception
    logged = (
        f"steps up to {step - 1} are in {Path(run_dir) / 'metrics.jsonl'}; " if step > 1 else ""
    )
    if saved:
        where = (
            f"the last checkpoint is {checkpoint.root(cfg, run_dir) / f'step-{saved}'}: change "
            "the recipe and continue from it with resume=auto"
        )
    else:
        where = "no checkpoint was saved (checkpoint.every=N saves one every N steps)"
    return f"step {step}: {cause}. The run stopped; {logged}{where}"


def _step_state(step: int, version: int, next_group: int, stream, buffer) -> dict[str, Any]:
    """What the driver must remember to resume after `step`."""
    import ray

    snapshot = ray.get(buffer.snapshot.remote())
    return dict(
        step=step,
        version=version,
        next_group=next_group,
        stream_position=stream.position,
        buffer=snapshot,
    )


def _save_checkpoint(cfg: RecipeConfig, run_dir, fp, trainer, logger, done: dict) -> None:
    from rlsys.trainer import checkpoint

    state = {
        **{k: done[k] for k in ("step", "version", "next_group", "stream_position", "buffer")},
        "run_dir": str(Path(run_dir).resolve()),
        "wandb_id": logger.wandb_id,
        "rng": checkpoint.rng_state(),
    }
    path = checkpoint.save_checkpoint(
        checkpoint.root(cfg, run_dir),
        done["step"],
        lambda p: trainer.call("save_state", p),
        state,
        fingerprint=fp or {},
        keep=cfg.checkpoint.keep,
    )
    logger.info(f"checkpoint: {path}")


def _restore(resumed: Resume, trainer, buffer, stream, sync) -> dict:
    """Bring fresh actors to a checkpoint: trainer (weights, optimizer, schedule, RNG), buffer,
    prompt position, driver RNG; the rollout workers get the saved policy and version."""
    import ray

    from rlsys.trainer import checkpoint

    st = resumed.state
    checkpoint.load_trainer(lambda p: trainer.call("load_state", p), resumed.path)
    ray.get(buffer.restore.remote(st["buffer"]))
    stream.position = st["stream_position"]
    checkpoint.set_rng_state(st["rng"])
    if st["version"]:
        sync.push(st["version"])
    return st


def _collect_groups(
    cfg: RecipeConfig,
    stream,
    workers: RolloutPool,
    buffer,
    step: int,
    next_group: int,
    version: int,
) -> tuple[list, list[dict], dict[str, Any]]:
    """Generate one batch of scored groups through the buffer.

    With DAPO dynamic sampling, groups whose trainable rewards are all equal carry no GRPO
    signal and are dropped; up to `max_rounds` extra rounds refill the batch, after which the
    step trains on what it has (at least one group, else on the unfiltered last round)."""
    import ray

    from rlsys.rollout.pool import Call

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
        round_outs = workers.call(
            [Call(i, "generate", (p, g, seed + i, version)) for i, (p, g) in enumerate(shares) if p]
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


def _collect_partial(
    cfg: RecipeConfig,
    stream,
    workers: RolloutPool,
    buffer,
    step: int,
    next_group: int,
    version: int,
) -> tuple[list, list[dict], dict[str, Any]]:
    """One partial-rollout round (APRIL): ceil(over_provision x B) groups in flight, recycled
    ones first; each worker stops once its share of the B groups is complete and hands back
    the unfinished rest, which the buffer keeps for the next step."""
    import ray

    from rlsys.rollout.pool import Call

    r = cfg.rollout
    want = r.prompts_per_step
    # complete groups left over from the last round (they finished together with the batch)
    # count toward this batch: start only what is still needed
    need = max(want - ray.get(buffer.stats.remote())["buffer/depth"], 0)
    total = math.ceil(r.partial.over_provision * need)
    recycled = ray.get(buffer.take_recycled.remote(total))
    prompts = stream.next(total - len(recycled))
    gids = list(range(next_group, next_group + len(prompts)))
    n_w = min(len(workers), need)
    seed = cfg.seed * 1_000_003 + step * 101
    outs = workers.call(
        [
            Call(
                i,
                "generate_round",
                (
                    prompts[i::n_w],
                    gids[i::n_w],
                    recycled[i::n_w],
                    need // n_w + (i < need % n_w),
                    seed + i,
                    version,
                ),
            )
            for i in range(n_w)
        ]
    )
    for o in outs:
        ray.get(buffer.put.remote(o["groups"]))
        ray.get(buffer.recycle.remote(o["partial"]))
    depth = ray.get(buffer.stats.remote())["buffer/depth"]
    groups = ray.get(buffer.get_batch.remote(min(want, depth)))
    if r.partial.stale == "mask":
        _mask_stale(groups, version)
    old = [v for g in groups for sm in g.samples for v in sm.versions if v >= 0]
    stats = {
        "groups_started": len(prompts),
        "rollout/recycled_groups": len(recycled),
        "rollout/aborted_samples": sum(o["stats"]["rollout/aborted_samples"] for o in outs),
        "rollout/leftover_groups": want - need,
        "rollout/stale_token_frac": sum(v < version for v in old) / max(len(old), 1),
        "rollout/staleness_max": version - min(old, default=version),
    }
    return groups, outs, stats


def _mask_stale(groups: list, version: int) -> None:
    """No gradient through tokens an older policy generated (`rollout.partial.stale: mask`)."""
    for g in groups:
        for sm in g.samples:
            sm.loss_mask = [
                m if v < 0 or v >= version else 0
                for m, v in zip(sm.loss_mask, sm.versions, strict=True)
            ]


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
    gen_s = max((o["stats"]["rollout/gen_s"] for o in outs), default=0.0)
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
