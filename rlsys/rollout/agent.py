"""Multi-turn rollouts: the agent loop, the `Env` API, and token-in / token-out bookkeeping.

```
 prompt_ids ─► generate_fn ─► model tokens ──► Sample.append(loss_mask 1, logprobs, version)
      ▲                                │ decode once (never re-tokenized)
      │                                ▼
      │                         env.step(text) ─► StepResult(observation, reward, done)
      │                                │ + turn control (reminder / extension notice)
      │                                ▼
      └── env tokens ◄── chat-template delta ◄── observation messages (truncated, sanitized)
          Sample.append(loss_mask 0)
```

`AgentLoop.run(trajectories, generate_fn)` is engine-independent: `generate_fn` takes a list of
`GenCall`s (prompt + response ids so far, a token cap, stop ids, a seed) and returns one
`GenOut` per call (new ids, their logprobs, optionally their versions, a finish reason).
`engine_generate_fn` adapts a `RolloutEngine`, `hf_generate_fn` the `HFGenerator`.

Env API (a user env is named in a recipe as `pkg.module:Class` or `file.py:Class` and built
with `rollout.agent.env_kwargs`, one instance per trajectory): `reset(meta)` gets the task's
record; `step(assistant_text) -> StepResult` returns the observation (a string, a chat message
dict, a list of them, or None), a step reward and done. Optional `state_dict()` /
`load_state_dict(d)` (JSON-able) let a suspended trajectory move to another process. The
built-in `ToolEnv` parses tool calls with a pluggable parser and runs `Tool`s.

Observation and reminder tokens are appended with loss_mask 0 through `ChatCodec`
(rlsys/rollout/turns.py), which matches a fresh tokenization of the whole conversation; its
docstring lists the boundaries where exact equality cannot hold.

Termination reasons (`Sample.stop_reason`): done, max_turns, max_tokens, tool_error, aborted
(suspended; continue with `run` again or `resume` in another process), error (the engine
failed the request).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from rlsys.rollout.tools import (
    TERMINATIONS,
    AgentConfig,
    Env,
    StepResult,
    ToolEnv,
    build_tool,
)
from rlsys.rollout.tools.parsers import build_parser
from rlsys.rollout.turns import ChatCodec, TurnController, TurnsConfig, TurnState
from rlsys.types import Sample, Status

_STATUS = {"done": Status.DONE, "aborted": Status.ABORTED}  # all other reasons: TRUNCATED
AGENT_KEY = "_agent"
"""`sample.meta[AGENT_KEY]`: the trajectory's JSON-able state (conversation, turn state,
counters), written whenever `run` returns; what `AgentLoop.resume` rebuilds from."""


# ---------------------------------------------------------------------------------------------
# envs


def make_env_factory(cfg: AgentConfig) -> Callable[[], Env]:
    """A constructor of fresh envs from `rollout.agent` (tools and parser are shared)."""
    if cfg.env is None:
        raise ValueError("rollout.agent.env is null: single-turn rollouts need no env")
    if cfg.env == "tools":
        tools = [build_tool(s, **cfg.tool_kwargs.get(s, {})) for s in cfg.tools]
        parser = build_parser(cfg.parser)
        return lambda: ToolEnv(tools, parser, cfg.max_tool_errors, **cfg.env_kwargs)
    from rlsys.reward.api import load_callable

    cls = load_callable(cfg.env, "rollout.agent.env")
    return lambda: cls(**cfg.env_kwargs)


def check_agent(cfg: AgentConfig) -> None:
    """Load every class `rollout.agent` names (env, tools, parser) in this process, so that a
    bad spec is a ConfigError before any actor starts, not an actor that dies."""
    from rlsys.config import ConfigError
    from rlsys.reward.api import load_callable
    from rlsys.rollout.tools import TOOLS
    from rlsys.rollout.tools.parsers import PARSERS

    if cfg.env is None:
        return
    specs = []
    if cfg.env != "tools":
        specs.append(("rollout.agent.env", cfg.env))
    else:
        specs += [("rollout.agent.tools", TOOLS.get(t, t)) for t in cfg.tools]
        if cfg.parser not in PARSERS:
            specs.append(("rollout.agent.parser", cfg.parser))
    for what, spec in specs:
        if not callable(load_callable(spec, what)):
            raise ConfigError(f"{what} '{spec}' names an object that is not a class")


# ---------------------------------------------------------------------------------------------
# the generation seam


@dataclass
class GenCall:
    """Continue one trajectory: generate after `prompt_ids + response_ids`."""

    request_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    max_new_tokens: int
    stop_token_ids: list[int]
    seed: int | None = None  # derived from the trajectory and its length: resume-stable

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


@dataclass
class GenOut:
    """New tokens for one `GenCall` (the stop token, if any, is the last one)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | abort | error
    versions: list[int] | None = None  # per token; None = the `version` given to `run`
    error: str | None = None


GenerateFn = Callable[[list[GenCall]], list[GenOut]]


def derive_seed(base: int, request_id: str) -> int:
    """A 31-bit seed from a base seed and a request id (group, index, response length): every
    trajectory and turn samples differently, and a resumed call gets the same seed again."""
    digest = hashlib.blake2b(f"{base}-{request_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def engine_generate_fn(engine: Any, params: Any) -> GenerateFn:
    """Adapt a `RolloutEngine` (batch `generate`) with base `SamplingParams`."""
    from rlsys.rollout.engine import GenerationRequest

    def generate(calls: list[GenCall]) -> list[GenOut]:
        reqs = [
            GenerationRequest(
                request_id=c.request_id,
                prompt_ids=list(c.prompt_ids),
                response_ids=list(c.response_ids),
                params=replace(
                    params,
                    max_new_tokens=c.max_new_tokens,
                    stop_token_ids=sorted(set(params.stop_token_ids) | set(c.stop_token_ids)),
                    seed=_seed(params.seed, c),
                ),
            )
            for c in calls
        ]
        outs: list[GenOut] = []
        for r in engine.generate(reqs):
            if r.error is not None or not r.completions:
                outs.append(GenOut([], [], "error", error=r.error or "no completion"))
                continue
            c = r.completions[0]
            outs.append(GenOut(c.token_ids, c.logprobs, c.finish_reason, list(c.versions)))
        return outs

    return generate


def _seed(base: int | None, call: GenCall) -> int | None:
    # one shared seed would give every sample of a group the same tokens: derive per request
    if call.seed is not None or base is None:
        return call.seed
    return derive_seed(base, call.request_id)


def hf_generate_fn(
    generator: Any, temperature: float, top_p: float, greedy: bool = False
) -> GenerateFn:
    """Adapt an `HFGenerator` (one batched `generate`; per-call caps and stop ids applied by
    cutting its output)."""

    def generate(calls: list[GenCall]) -> list[GenOut]:
        if not calls:
            return []
        cap = max(c.max_new_tokens for c in calls)
        seed = calls[0].seed or 0
        groups = generator.generate(
            [c.token_ids for c in calls], 1, cap, temperature, top_p, seed, greedy=greedy
        )
        outs = []
        for c, group in zip(calls, groups, strict=True):
            toks, lps = group[0].tokens[: c.max_new_tokens], group[0].logprobs
            stops = set(c.stop_token_ids)
            end = next((i + 1 for i, t in enumerate(toks) if t in stops), None)
            if end is None and group[0].finished and len(group[0].tokens) <= c.max_new_tokens:
                end = len(toks)  # the generator's own eos
            n = end or len(toks)
            outs.append(GenOut(toks[:n], lps[:n], "stop" if end else "length"))
        return outs

    return generate


# ---------------------------------------------------------------------------------------------
# trajectories


@dataclass
class Trajectory:
    """A multi-turn trajectory in progress: the `Sample` (token ids, the record of truth),
    the conversation as text (for the template), the env, and turn state."""

    sample: Sample
    messages: list[dict]
    env: Any
    turns: TurnState
    turn_start: int = 0  # index in response_ids where the current assistant turn began
    termination: str | None = None
    env_reward: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)  # counters for agent_metrics
    error: str | None = None  # message of an engine / env failure
    ended_on_eot: bool = False  # the last assistant turn ended on the end-of-turn token
    extension: str | None = None  # outcome of the last turn's extension request

    @property
    def finished(self) -> bool:
        return self.termination is not None

    @property
    def final_response(self) -> str:
        """The last assistant turn's text (what a final-answer reward should read)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def state_dict(self) -> dict:
        get = getattr(self.env, "state_dict", None)
        return {
            "messages": [dict(m) for m in self.messages],
            "turns": self.turns.to_dict(),
            "turn_start": self.turn_start,
            "termination": self.termination,
            "env_reward": self.env_reward,
            "stats": dict(self.stats),
            "error": self.error,
            "env_state": get() if callable(get) else None,
            "final_response": self.final_response,
        }


def final_response(sample: Sample) -> str:
    """The last assistant turn of a sample that went through an `AgentLoop`."""
    return sample.meta.get(AGENT_KEY, {}).get("final_response", "")


class AgentLoop:
    """Runs trajectories turn by turn against a `GenerateFn` (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        env_factory: Callable[[], Env],
        turns: TurnsConfig | None = None,
        *,
        max_new_tokens: int = 256,
        observation_role: str = "user",
        env_workers: int = 4,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        """`max_new_tokens` is the per-turn cap unless `turns.max_turn_tokens` is set;
        `stop_token_ids` are extra ids that end a turn (the template's end-of-turn token and
        the tokenizer's eos always do); `seed` makes sampling per trajectory and turn
        reproducible (see `derive_seed`)."""
        self.codec = ChatCodec(tokenizer)
        self.stop_token_ids = sorted(set(self.codec.stop_token_ids) | set(stop_token_ids))
        self.env_factory = env_factory
        self.cfg = turns or TurnsConfig()
        self.control = TurnController(self.cfg)
        self.max_turn_tokens = self.cfg.max_turn_tokens or max_new_tokens
        self.observation_role = observation_role
        self.env_workers = max(1, env_workers)
        self.seed = seed

    @classmethod
    def from_config(
        cls,
        agent: AgentConfig,
        turns: TurnsConfig,
        tokenizer: Any,
        max_new_tokens: int,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> AgentLoop:
        """The loop a recipe describes (`rollout.agent`, `rollout.turns`)."""
        agent.validate()
        return cls(
            tokenizer,
            make_env_factory(agent),
            turns,
            max_new_tokens=max_new_tokens,
            observation_role=agent.observation_role,
            env_workers=agent.env_workers,
            seed=seed,
            stop_token_ids=stop_token_ids,
        )

    # -- creating and resuming ----------------------------------------------------------------

    def start(self, sample: Sample, prompt_messages: list[dict]) -> Trajectory:
        """A new trajectory for a fresh sample whose `prompt_ids` are the tokenized template of
        `prompt_messages` with the generation prompt; the env is reset with `sample.meta`."""
        if sample.response_ids:
            raise ValueError("start() needs a fresh sample; use resume() to continue one")
        env = self.env_factory()
        env.reset(dict(sample.meta))
        msgs = [dict(m) for m in prompt_messages]
        return Trajectory(sample, msgs, env, self.control.start())

    def resume(self, sample: Sample) -> Trajectory:
        """Rebuild a suspended trajectory from `sample.meta[AGENT_KEY]` (e.g. in another
        process): a fresh env is reset with the task meta and given its saved state."""
        state = sample.meta[AGENT_KEY]
        env = self.env_factory()
        env.reset({k: v for k, v in sample.meta.items() if k != AGENT_KEY})
        if state.get("env_state") is not None:
            env.load_state_dict(state["env_state"])
        return Trajectory(
            sample,
            [dict(m) for m in state["messages"]],
            env,
            TurnState(**state["turns"]),
            turn_start=state["turn_start"],
            termination=state["termination"],
            env_reward=state["env_reward"],
            stats=dict(state["stats"]),
            error=state.get("error"),
        )

    # -- the loop --------------------------------------------------------------------------------

    def run(
        self,
        trajectories: Sequence[Trajectory],
        generate_fn: GenerateFn,
        *,
        version: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Trajectory]:
        """Advance every unfinished trajectory until it terminates or is aborted: by the engine
        mid-turn (`finish_reason == "abort"`, the partial turn is kept) or by `should_stop()`
        returning True between turns. Aborted ones get status ABORTED / stop reason `aborted`
        and continue from their token ids when passed to `run` again. `version` is the policy
        version recorded for tokens whose `GenOut` carries no versions."""
        active = [t for t in trajectories if not t.finished]
        for t in active:
            t.sample.status, t.sample.stop_reason = Status.RUNNING, None
        with ThreadPoolExecutor(self.env_workers) as pool:
            while active:
                if should_stop is not None and should_stop():
                    for t in active:
                        t.sample.finish(Status.ABORTED, "aborted")
                    break
                calls = []
                for t in list(active):
                    cap = self._cap(t)
                    if cap > 0:
                        calls.append(self._call(t, cap))
                    else:
                        self._finish(t, "max_tokens")
                active = [t for t in active if not t.finished]
                if not active:
                    break
                outs = generate_fn(calls)
                if len(outs) != len(calls):
                    raise RuntimeError(f"generate_fn returned {len(outs)} outputs for {len(calls)}")
                stepping = []
                for t, out in zip(active, outs, strict=True):
                    if self._append_model(t, out, version):
                        stepping.append(t)
                results = pool.map(lambda t: self._step_env(t), stepping)
                for t, res in zip(stepping, results, strict=True):
                    self._after_step(t, res)
                active = [t for t in active if t.sample.status is Status.RUNNING]
        for t in trajectories:
            t.sample.meta[AGENT_KEY] = t.state_dict()
        return list(trajectories)

    def _cap(self, t: Trajectory) -> int:
        n = len(t.sample.response_ids)
        in_turn = n - t.turn_start
        return min(self.max_turn_tokens - in_turn, self.cfg.max_total_tokens - n)

    def _call(self, t: Trajectory, cap: int) -> GenCall:
        s = t.sample
        rid = f"{s.group_id}-{s.index}-{len(s.response_ids)}"
        seed = None if self.seed is None else derive_seed(self.seed, rid)
        return GenCall(rid, s.prompt_ids, s.response_ids, cap, self.stop_token_ids, seed=seed)

    def _append_model(self, t: Trajectory, out: GenOut, version: int) -> bool:
        """Append generated tokens; return True when the turn ended and the env should step."""
        toks, lps = list(out.token_ids), list(out.logprobs)
        if len(lps) != len(toks) or any(not math.isfinite(x) for x in lps):
            return self._finish(t, "error", "generate_fn returned bad logprobs")
        versions = out.versions if out.versions is not None else [version] * len(toks)
        i = 0
        while i < len(toks):  # one append per run of equal versions
            j = i
            while j < len(toks) and versions[j] == versions[i]:
                j += 1
            t.sample.append(toks[i:j], lps[i:j], int(versions[i]), trainable=True)
            i = j
        t.stats["model_tokens"] = t.stats.get("model_tokens", 0.0) + len(toks)
        if out.finish_reason == "abort":
            t.sample.finish(Status.ABORTED, "aborted")
            return False
        if out.finish_reason == "error":
            return self._finish(t, "error", out.error)
        turn = t.sample.response_ids[t.turn_start :]
        stopped = bool(turn) and turn[-1] in self.stop_token_ids
        if not turn:
            return self._finish(t, "error", "generate_fn returned no tokens")
        content = self.codec.decode(turn[:-1] if stopped else turn)
        t.messages.append({"role": "assistant", "content": content})
        t.extension = self.control.end_turn(t.turns, content)
        t.sample.turns = t.turns.turns
        if out.finish_reason != "stop":  # cut at the turn or trajectory token cap
            t.ended_on_eot = False
            return self._finish(t, "max_tokens")
        t.ended_on_eot = stopped and turn[-1] == self.codec.end_of_turn_id
        return True

    def _step_env(self, t: Trajectory) -> StepResult:
        """Step the env (in a pool thread) and check what it returned."""
        try:
            res = t.env.step(t.messages[-1]["content"])
            if not isinstance(res, StepResult):
                raise TypeError(f"env.step returned {type(res).__name__}, not StepResult")
            res.reward = float(res.reward)
            if not math.isfinite(res.reward):
                raise ValueError(f"env.step returned a non-finite reward {res.reward}")
            res.info = {k: float(v) for k, v in res.info.items()}
            obs = res.observation
            if isinstance(obs, list) and not all(isinstance(m, dict) for m in obs):
                raise TypeError("env.step observation list must hold chat message dicts")
            if obs is not None and not isinstance(obs, (str, dict, list)):
                raise TypeError(f"env.step observation of type {type(obs).__name__}")
            return res
        except Exception as e:  # a broken env ends its trajectory, never the worker
            t.error = f"env.step raised {type(e).__name__}: {e}"
            return StepResult(termination="tool_error", info={"env_error": 1.0})

    def _after_step(self, t: Trajectory, res: StepResult) -> None:
        t.env_reward += res.reward
        for k in ("tool_calls", "tool_ok", "env_error"):
            t.stats[k] = t.stats.get(k, 0.0) + res.info.get(k, 0.0)
        if res.termination is not None:
            reason = res.termination if res.termination in TERMINATIONS else "tool_error"
            self._finish(t, reason)
            return
        if res.done:
            self._finish(t, "done")
            return
        if self.control.exhausted(t.turns):
            self._finish(t, "max_turns")
            return
        new = self._observation_messages(t, res.observation)
        notice = self.control.message(t.turns, t.extension)
        if notice is not None:
            if self.cfg.reminder_placement == "append" and new:
                new[-1] = {**new[-1], "content": f"{new[-1]['content']}\n\n{notice}"}
            else:
                new.append({"role": self.cfg.reminder_role, "content": notice})
        ids = self.codec.env_ids(t.messages, new, t.ended_on_eot)
        if len(t.sample.response_ids) + len(ids) >= self.cfg.max_total_tokens:
            self._finish(t, "max_tokens")  # no room for the observation and another turn
            return
        t.sample.append(ids, None, -1, trainable=False)
        t.messages.extend(new)
        t.turn_start = len(t.sample.response_ids)
        t.stats["env_tokens"] = t.stats.get("env_tokens", 0.0) + len(ids)

    def _observation_messages(self, t: Trajectory, obs: Any) -> list[dict]:
        if obs is None:
            msgs = []
        elif isinstance(obs, str):
            msgs = [{"role": self.observation_role, "content": obs}]
        elif isinstance(obs, dict):
            msgs = [obs]
        else:
            msgs = list(obs)
        out = []
        for m in msgs:
            text = self.codec.defuse(str(m.get("content", "")))
            text, cut = self.codec.truncate(text, self.cfg.max_observation_tokens)
            t.stats["obs_truncated"] = t.stats.get("obs_truncated", 0.0) + cut
            out.append({**m, "role": m.get("role", self.observation_role), "content": text})
        return out

    def _finish(self, t: Trajectory, reason: str, error: str | None = None) -> bool:
        t.termination = reason
        if error:
            t.error = error
        t.sample.finish(_STATUS.get(reason, Status.TRUNCATED), reason)
        return False


# ---------------------------------------------------------------------------------------------
# metrics


def agent_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """`rollout/agent/*`: turns, tool calls and success rate, tokens per turn, termination
    reasons, reminder and extension counts, truncated observations, env reward."""
    n = len(trajectories)
    if n == 0:
        return {}
    turns = [t.turns.turns for t in trajectories]

    def total(key: str) -> float:
        return sum(t.stats.get(key, 0.0) for t in trajectories)

    n_turns = max(sum(turns), 1)
    calls = total("tool_calls")
    out = {
        "rollout/agent/turns_mean": sum(turns) / n,
        "rollout/agent/turns_max": float(max(turns)),
        "rollout/agent/tool_calls": calls,
        "rollout/agent/tool_calls_per_traj": calls / n,
        "rollout/agent/model_tokens_per_turn": total("model_tokens") / n_turns,
        "rollout/agent/env_tokens_per_turn": total("env_tokens") / n_turns,
        "rollout/agent/reminders": float(sum(t.turns.reminders for t in trajectories)),
        "rollout/agent/extensions_granted": float(sum(t.turns.extensions for t in trajectories)),
        "rollout/agent/extensions_refused": float(sum(t.turns.refused for t in trajectories)),
        "rollout/agent/obs_truncated": total("obs_truncated"),
        "rollout/agent/env_errors": total("env_error"),
        "rollout/agent/env_reward_mean": sum(t.env_reward for t in trajectories) / n,
    }
    if calls:
        out["rollout/agent/tool_success_rate"] = total("tool_ok") / calls
    for reason in TERMINATIONS:
        k = sum(
            (t.termination or ("aborted" if t.sample.status is Status.ABORTED else "")) == reason
            for t in trajectories
        )
        out[f"rollout/agent/term_{reason}"] = float(k)
    return out


__all__ = [
    "AGENT_KEY",
    "TERMINATIONS",
    "AgentConfig",
    "AgentLoop",
    "ChatCodec",
    "Env",
    "GenCall",
    "GenOut",
    "GenerateFn",
    "StepResult",
    "ToolEnv",
    "Trajectory",
    "agent_metrics",
    "derive_seed",
    "engine_generate_fn",
    "final_response",
    "hf_generate_fn",
    "make_env_factory",
]
