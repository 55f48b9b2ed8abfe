"""Recipe schema and loading.

A recipe is a YAML file mirroring `RecipeConfig`; `key=value` overrides apply on top, then
OmegaConf interpolations (`${rollout.max_new_tokens}`) are resolved and every value is checked.
Every user mistake raises `ConfigError` with a message that names the key and the fix; the CLI
turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlsys.reward.config import RewardConfig, RewardPartConfig
from rlsys.rollout.tools import AgentConfig
from rlsys.rollout.turns import TurnsConfig


class ConfigError(ValueError):
    """A recipe or override the user must fix. Printed without a traceback, exit code 2."""


@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"
    """Zoo name (`smollm2-135m-instruct`, `tiny-llama`) or a local Hugging Face folder."""
    dtype: str = "float32"
    """Trainer parameter dtype: float32 | bfloat16."""


@dataclass
class DataConfig:
    task: str | None = "arithmetic"
    """Built-in task (`arithmetic`); null to read prompts from `path`."""
    path: str | None = None
    """Local JSONL or Parquet file with a `prompt` field (string or chat messages)."""
    eval_path: str | None = None
    """Optional held-out file in the same format."""
    prompt_key: str = "prompt"
    """Name of the prompt field in `path`."""
    system_prompt: str | None = None
    """Prepended as a system message when a prompt is a plain string."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (after the chat template) are an error."""
    num_train: int = 2000
    """Built-in task: size of the training split."""
    num_eval: int = 200
    """Built-in task: size of the held-out split."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the built-in task (e.g. `max_operand`)."""


@dataclass
class RolloutConfig:
    engine: str = "native"
    """Generation backend: `native` (continuous batching, KV-cache pool; Llama-family models)
    or `hf` (batched transformers generate, any architecture)."""
    max_batch: int = 64
    """native: KV-cache slots, i.e. samples decoded together."""
    prompts_per_step: int = 8
    """Prompt groups per training step."""
    n_samples_per_prompt: int = 8
    """Samples per prompt (the GRPO group size)."""
    max_new_tokens: int = 32
    """Response length cap."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores tokens under the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]."""
    dtype: str = "float32"
    """Rollout model dtype: float32 | bfloat16."""
    workers: int = 1
    """Number of rollout worker actors."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """Multi-turn rollouts: env and tools (`agent.env: null` = single turn)."""
    turns: TurnsConfig = field(default_factory=TurnsConfig)
    """Multi-turn turn control: unlimited | fixed | dynamic, token budgets."""


@dataclass
class KLConfig:
    mode: str = "none"
    """none | reward (per-token penalty in the reward) | loss (a term in the policy loss)."""
    estimator: str = "low_var_kl"
    """k1 | k2 | k3 | low_var_kl (k3 clamped to [-10, 10])."""
    coef: float = 0.001
    """KL coefficient beta (initial value when adaptive)."""
    adaptive: bool = False
    """Adapt beta towards `target` (Ziegler et al. 2019); reward mode only."""
    target: float = 0.01
    """Target KL per token for the adaptive controller."""
    horizon: int = 10000
    """Adaptive controller horizon in samples."""


@dataclass
class OffPolicyConfig:
    mode: str = "none"
    """none | tis (truncated importance weights) | decoupled (decoupled PPO objective)."""
    cap: float = 2.0
    """TIS clamp C on the behaviour->trainer weight; decoupled: tokens above it are dropped."""


@dataclass
class DynamicSamplingConfig:
    enabled: bool = False
    """DAPO: drop groups whose rewards are all equal; sample more until the batch is full."""
    max_rounds: int = 3
    """Extra generation rounds allowed per step before training on what is there."""


@dataclass
class OverlongConfig:
    enabled: bool = False
    """DAPO soft overlong penalty for responses near rollout.max_new_tokens."""
    buffer: int = 8
    """Penalty ramps linearly from 0 to -penalty over the last `buffer` tokens."""
    penalty: float = 1.0
    """Penalty at the length cap."""


@dataclass
class CriticConfig:
    path: str | None = None
    """Critic backbone: null = a copy of the policy model; or a zoo name / HF folder."""
    lr: float = 1e-5
    """Critic AdamW learning rate."""
    value_clip: float = 0.2
    """Clip of the value update around the old values (PPO value clipping)."""
    warmup_steps: int = 0
    """Steps that train only the critic before the policy starts updating."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """Estimator: grpo | rloo | reinforce_pp | remax | gae (PPO, needs a critic)."""
    norm_adv_by_std: bool = True
    """grpo: divide group-centred rewards by the group std (off = Dr.GRPO)."""
    group_baseline: bool = False
    """reinforce_pp: subtract the group mean before batch normalisation."""
    policy_loss: str = "clipped"
    """clipped (PPO ratio clip) | reinforce (plain REINFORCE, ReMax)."""
    clip_low: float = 0.2
    """Ratio clip below: ratio >= 1 - clip_low."""
    clip_high: float = 0.2
    """Ratio clip above: ratio <= 1 + clip_high (DAPO clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 capping the loss of negative-advantage tokens; null = off."""
    loss_agg: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    norm_len: int | None = None
    """seq-mean-token-sum-norm divisor; null = rollout.max_new_tokens."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (loss -= coef * entropy)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 1.0
    """GAE lambda."""
    kl: KLConfig = field(default_factory=KLConfig)
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class TrainerConfig:
    lr: float = 1e-6
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch (PPO-style reuse; 1 = strictly on-policy)."""
    micro_batch_size: int = 16
    """Samples per forward/backward when packing is off; gradients accumulate."""
    packing: bool = True
    """Pack samples into rows of `micro_batch_tokens` (no padding compute, no cross-sample
    attention) instead of padded micro-batches of `micro_batch_size`."""
    micro_batch_tokens: int = 2048
    """Token budget of one packed micro-batch."""
    fused_logprob: bool = True
    """Fused LM-head + log-softmax + entropy (never materialises [tokens x vocab] logits)."""
    autocast_bf16: bool = True
    """Run forward/backward matmuls in bfloat16 autocast (fp32 master weights)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward (policy and critic): less memory."""
    ranks: int = 1
    """Trainer ranks: Ray actors forming one DeepSpeed data-parallel group (gloo on CPU,
    NCCL on GPU); micro-batches are balanced across them by token count."""
    zero_stage: int | None = None
    """DeepSpeed ZeRO stage across the ranks: 0 replicate, 1 shard optimizer state,
    2 + gradients, 3 + parameters (the reference model and critic are sharded the same way).
    null = 2 with several ranks (or offload), 0 on one rank (nothing to shard)."""
    precision: str = "fp32"
    """Trainer weights: fp32, or bf16 (bf16 weights, fp32 master copy in the optimizer)."""
    offload: bool = False
    """ZeRO-Offload: optimizer state and step on the CPU (GPU runs; stage >= 1)."""
    lr_schedule: str = "constant"
    """LR after warm-up: constant, linear (to 0), or cosine (to 0) over all optimizer steps."""
    warmup_steps: int = 0
    """Optimizer steps of linear LR warm-up."""
    bucket_mb: int = 64
    """Communication bucket (MB) for gradient reduction and ZeRO-3 parameter gathers."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on the held-out split every N steps (and after the last); 0 = never."""
    num_prompts: int = 64
    """Held-out prompts per evaluation (the first N of the split)."""
    k: int = 4
    """Samples per prompt for pass@k / mean@k; 1 = greedy only."""
    max_new_tokens: int | None = None
    """Response cap for evaluation; null = rollout.max_new_tokens."""
    solve_threshold: float = 1.0
    """A response counts as solved when its reward is at least this."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline | online | disabled."""
    project: str = "rlsys"
    """W&B project name."""
    name: str | None = None
    """Run name; defaults to the run folder's name."""


@dataclass
class LoggingConfig:
    run_dir: str | None = None
    """Run folder; default `runs/<recipe>-<timestamp>`."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot: bool = True
    """Write `plot.png` (reward and loss per step) at the end."""
    samples_every: int = 5
    """Log a W&B table of sample rollouts every N steps; 0 = never."""
    samples_per_table: int = 16
    """Rows in each samples table."""


@dataclass
class SyncConfig:
    method: str = "broadcast"
    """Trainer -> rollout weight transfer: broadcast (a gloo/NCCL group, bucketed) or
    object_store (one full copy through Ray's shared memory)."""
    bucket_mb: float = 64
    """Bucket size (MB, rollout dtype) of a broadcast push: one collective per bucket."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every N steps (and on Ctrl-C); 0 = off."""
    keep: int = 2
    """Checkpoints kept (the newest K); older ones are deleted after a new one is complete."""
    dir: str | None = None
    """Checkpoint folder; null = `<run dir>/checkpoints`."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address of an existing cluster; null = `RAY_ADDRESS` or a local Ray."""
    num_cpus: int | None = None
    """CPUs Ray may schedule on a local start; null = what this machine has (at least 2)."""
    threads_per_actor: int | None = None
    """torch threads in each compute actor; null = all cores (roles take turns on-policy)."""


@dataclass
class RecipeConfig:
    name: str = "rlsys"
    """Run name; the run folder and W&B run are named after it."""
    seed: int = 0
    """Seed for data, sampling and initialisation."""
    steps: int = 20
    """Training steps (one rollout batch and one policy update each)."""
    resume: str = ""
    """Empty = a fresh run; `auto` = continue from the latest checkpoint of this recipe's run
    (`checkpoint.dir`, `logging.run_dir`, or the newest `runs/<recipe>-*`), fresh if none;
    or a path: a `step-N` checkpoint, a checkpoints folder or a run folder (its latest)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# ---------------------------------------------------------------------------------------------
# loading


def _check_keys(data: Any, schema: type, prefix: str = "") -> None:
    """Reject keys that the schema does not have, suggesting the closest valid one."""
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = sorted(fields)
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{full}'.{hint} Valid keys here: {', '.join(valid)}.")
        if full == "reward.parts" and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(item, RewardPartConfig, f"{full}[{i}].")
        sub = _dataclass_type(fields[key])
        if sub is not None:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"'{full}' must be a mapping of {sub.__name__} fields")
            _check_keys(value, sub, f"{full}.")


def _dataclass_type(f: dataclasses.Field) -> type | None:
    default = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    if default is not None:
        obj = default()
        if dataclasses.is_dataclass(obj):
            return type(obj)
    return None


def _parse_overrides(overrides: list[str]) -> dict:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form key=value (e.g. trainer.lr=1e-5)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a YAML recipe (or the defaults when `path` is None), apply `key=value` overrides,
    resolve interpolations and validate. Raises `ConfigError` on any user mistake."""
    layers: list[dict] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p} (pass a path to a .yaml recipe)")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(p))
        except Exception as e:  # yaml.YAMLError and OmegaConf errors alike
            raise ConfigError(f"cannot parse {p}: {e}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping of keys to values")
        layers.append(raw)
    layers.append(_parse_overrides(list(overrides or [])))
    for layer in layers:
        _check_keys(layer, RecipeConfig)
    base = OmegaConf.structured(RecipeConfig)
    try:
        merged = OmegaConf.merge(base, *layers)
        OmegaConf.resolve(merged)
        cfg: RecipeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).split("\n")[0]
        raise ConfigError(f"bad value for '{key}': {msg}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RecipeConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> RecipeConfig:
    merged: DictConfig = OmegaConf.merge(OmegaConf.structured(RecipeConfig), d)  # type: ignore[assignment]
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# validation

ADVANTAGES = ("grpo", "rloo", "reinforce_pp", "remax", "gae")
ENGINES = ("native", "hf")
DTYPES = ("float32", "bfloat16")
WANDB_MODES = ("offline", "online", "disabled")


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        names = [str(o) for o in options]
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(names)}.{hint}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} must be {need}, got {value}")


def validate(cfg: RecipeConfig) -> None:
    """Range and consistency checks that the type system cannot express."""
    from rlsys.models import ZOO  # local: models imports heavy libraries lazily
    from rlsys.trainer.losses import KL_ESTIMATORS, LOSS_AGG, OFF_POLICY, POLICY_LOSSES

    al = cfg.algorithm
    _choice("algorithm.advantage", al.advantage, ADVANTAGES)
    _choice("algorithm.policy_loss", al.policy_loss, POLICY_LOSSES)
    _choice("algorithm.loss_agg", al.loss_agg, LOSS_AGG)
    _choice("algorithm.kl.mode", al.kl.mode, ("none", "reward", "loss"))
    _choice("algorithm.kl.estimator", al.kl.estimator, KL_ESTIMATORS)
    _choice("algorithm.off_policy.mode", al.off_policy.mode, OFF_POLICY)
    _positive("algorithm.kl.coef", al.kl.coef, allow_zero=True)
    _positive("algorithm.kl.target", al.kl.target)
    _positive("algorithm.kl.horizon", al.kl.horizon)
    _positive("algorithm.off_policy.cap", al.off_policy.cap)
    _positive("algorithm.entropy_coef", al.entropy_coef, allow_zero=True)
    _positive("algorithm.critic.lr", al.critic.lr)
    _positive("algorithm.dynamic_sampling.max_rounds", al.dynamic_sampling.max_rounds, True)
    _positive("algorithm.overlong.buffer", al.overlong.buffer)
    if al.dual_clip is not None and al.dual_clip <= 1.0:
        raise ConfigError(f"algorithm.dual_clip must be > 1 (or null), got {al.dual_clip}")
    for k in ("gamma", "lam"):
        if not 0.0 <= getattr(al, k) <= 1.0:
            raise ConfigError(f"algorithm.{k} must be in [0, 1], got {getattr(al, k)}")
    if al.overlong.enabled and al.overlong.buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"algorithm.overlong.buffer ({al.overlong.buffer}) must be smaller than "
            f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens})"
        )
    if (
        al.critic.path is not None
        and al.critic.path not in ZOO
        and not Path(al.critic.path).is_dir()
    ):
        raise ConfigError(f"algorithm.critic.path: '{al.critic.path}' is not a zoo model or folder")
    _choice("rollout.engine", cfg.rollout.engine, ENGINES)
    _choice("rollout.dtype", cfg.rollout.dtype, DTYPES)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    _positive("steps", cfg.steps)
    _positive("trainer.lr", cfg.trainer.lr)
    _positive("trainer.weight_decay", cfg.trainer.weight_decay, allow_zero=True)
    _positive("trainer.grad_clip", cfg.trainer.grad_clip, allow_zero=True)
    _positive("trainer.mini_batches", cfg.trainer.mini_batches)
    _positive("trainer.micro_batch_size", cfg.trainer.micro_batch_size)
    _positive("trainer.micro_batch_tokens", cfg.trainer.micro_batch_tokens)
    _positive("rollout.prompts_per_step", cfg.rollout.prompts_per_step)
    _positive("rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    _positive("rollout.temperature", cfg.rollout.temperature)
    _positive("rollout.workers", cfg.rollout.workers)
    _positive("rollout.max_batch", cfg.rollout.max_batch)
    _positive("data.max_prompt_tokens", cfg.data.max_prompt_tokens)
    _positive("eval.every", cfg.eval.every, allow_zero=True)
    _positive("eval.num_prompts", cfg.eval.num_prompts)
    _positive("eval.k", cfg.eval.k)
    _positive("logging.samples_every", cfg.logging.samples_every, allow_zero=True)
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    try:
        cfg.rollout.agent.validate()
        cfg.rollout.turns.validate()
    except ValueError as e:
        raise ConfigError(f"rollout.{e}") from None
    if cfg.rollout.agent.env is not None and cfg.algorithm.advantage == "remax":
        raise ConfigError(
            "rollout.agent: multi-turn rollouts do not support ReMax's greedy baseline"
        )
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    if len(cfg.trainer.betas) != 2 or not all(0 <= b < 1 for b in cfg.trainer.betas):
        raise ConfigError(f"trainer.betas must be two numbers in [0, 1), got {cfg.trainer.betas}")
    for k in ("clip_low", "clip_high"):
        v = getattr(cfg.algorithm, k)
        if not 0 < v < 1e3:
            raise ConfigError(f"algorithm.{k} must be > 0, got {v}")
    if al.advantage in ("grpo", "rloo") and cfg.rollout.n_samples_per_prompt < 2:
        name = "GRPO" if al.advantage == "grpo" else "RLOO"
        raise ConfigError(
            f"rollout.n_samples_per_prompt must be >= 2 for {name} (advantages are relative to "
            f"the group), got {cfg.rollout.n_samples_per_prompt}"
        )
    _positive("rollout.n_samples_per_prompt", cfg.rollout.n_samples_per_prompt)
    if cfg.trainer.mini_batches > cfg.rollout.prompts_per_step:
        raise ConfigError(
            f"trainer.mini_batches ({cfg.trainer.mini_batches}) cannot exceed "
            f"rollout.prompts_per_step ({cfg.rollout.prompts_per_step})"
        )
    _positive("trainer.ranks", cfg.trainer.ranks)
    _positive("trainer.warmup_steps", cfg.trainer.warmup_steps, allow_zero=True)
    _positive("trainer.bucket_mb", cfg.trainer.bucket_mb)
    _positive("sync.bucket_mb", cfg.sync.bucket_mb)
    _choice("sync.method", cfg.sync.method, ("broadcast", "object_store"))
    _choice("trainer.zero_stage", cfg.trainer.zero_stage, (None, 0, 1, 2, 3))
    _choice("trainer.precision", cfg.trainer.precision, ("fp32", "bf16"))
    _choice("trainer.lr_schedule", cfg.trainer.lr_schedule, ("constant", "linear", "cosine"))
    if cfg.trainer.offload and cfg.trainer.zero_stage == 0:
        raise ConfigError("trainer.offload needs trainer.zero_stage >= 1")
    if cfg.model.path not in ZOO and not Path(cfg.model.path).is_dir():
        raise ConfigError(
            f"model.path: '{cfg.model.path}' is neither a zoo model ({', '.join(ZOO)}) "
            "nor a local Hugging Face folder"
        )
    if cfg.data.task is None and cfg.data.path is None:
        raise ConfigError(
            "data: set either data.task (e.g. arithmetic) or data.path (a JSONL file)"
        )
    if cfg.data.task is not None:
        from rlsys.tasks import TASKS

        _choice("data.task", cfg.data.task, tuple(TASKS))
    for key in ("path", "eval_path"):
        v = getattr(cfg.data, key)
        if v is not None and cfg.data.task is None and not Path(v).is_file():
            raise ConfigError(f"data.{key}: file not found: {v}")
        if v is not None and Path(v).suffix not in (".jsonl", ".json", ".parquet"):
            raise ConfigError(f"data.{key}: expected a .jsonl or .parquet file, got {v}")
