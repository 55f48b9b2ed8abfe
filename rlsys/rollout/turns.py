"""Turns of a multi-turn rollout: how many are allowed (`rollout.turns`), and how the
boundary between an assistant turn and the env's messages is tokenized (`ChatCodec`).

Policies ("More with Less", 2025 — see REFERENCES.md):

- `unlimited`: no turn limit; a trajectory ends when the env says done or its token budget
  (`max_total_tokens`) runs out.
- `fixed`: at most `max_turns` assistant turns. Before each of the last `reminder_turns` turns a
  reminder ("You have 1 turn(s) left.") is injected as an env message.
- `dynamic`: a base budget of `max_turns`; whenever an assistant turn contains the
  `extension_request` string (default `<more_turns/>`) the budget grows by `extension_turns`,
  never beyond `hard_cap`. A request at the cap is refused. The outcome is told to the model in
  the same env message as the reminder, and reminders (before the last `reminder_turns` turns
  of the *current* budget) also say how to ask for more while the cap is not reached.

Token limits apply under every policy: `max_turn_tokens` new tokens per assistant turn,
`max_total_tokens` response tokens per trajectory (model + env tokens), and observations longer
than `max_observation_tokens` are truncated (with a visible marker) before they are tokenized.

`TurnController` is pure bookkeeping over a JSON-able `TurnState`, so a suspended trajectory
carries its turn state with it.

Observation tokens (`ChatCodec`): the template is rendered for the conversation up to the end
of the last assistant turn and up to the new env messages plus the generation prompt; the
difference is tokenized, prefixed by what the template writes after the model's end-of-turn
token (`"\\n"` after `<|im_end|>` in ChatML). Because that text starts right after a special
token, a fresh tokenization of the whole conversation splits there too, so the env tokens are
exactly the ones a full re-tokenization gives. Documented boundaries where equality cannot hold:

1. model tokens are kept as sampled; a fresh tokenization of their text may merge or split them
   differently (non-canonical tokenization) — their *text* still matches, unless the model
   emitted an incomplete UTF-8 byte sequence (byte-level BPE), which decodes to U+FFFD;
2. a finished trajectory ends at the model's end-of-turn token; the template's trailing
   closing text (`"\\n"`) is never part of the sample;
3. a turn that stops on a stop token other than the template's end-of-turn token keeps that
   token, and the env segment then starts with the template's full assistant suffix;
4. templates that rewrite earlier turns (e.g. strip reasoning from past assistant messages)
   are not prefix-stable and are rejected when the loop is built;
5. special-token strings inside observations are defused (a zero-width space after their
   first character) so tool output cannot forge chat structure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

POLICIES = ("unlimited", "fixed", "dynamic")


@dataclass
class TurnsConfig:
    """Turn and token limits of a multi-turn trajectory."""

    policy: str = "unlimited"
    """unlimited | fixed | dynamic."""
    max_turns: int = 4
    """fixed: the turn limit; dynamic: the base budget; unlimited: ignored."""
    reminder_turns: int = 1
    """Inject a reminder before each of the last K turns of the budget; 0 = never."""
    reminder: str = "You have {turns_left} turn(s) left."
    """Reminder text; `{turns_left}` and `{turns_used}` are filled in."""
    extension_hint: str = " To get {extension_turns} more, write {request} in your reply."
    """dynamic: appended to reminders while the hard cap is not reached."""
    extension_request: str = "<more_turns/>"
    """dynamic: the string an assistant turn contains to ask for more turns."""
    extension_turns: int = 2
    """dynamic: turns granted per request."""
    hard_cap: int = 8
    """dynamic: the budget never exceeds this many turns."""
    max_turn_tokens: int | None = None
    """New tokens per assistant turn; null = rollout.max_new_tokens."""
    max_total_tokens: int = 1024
    """Response tokens (model + env) per trajectory; the trajectory ends at the budget."""
    max_observation_tokens: int = 256
    """Observation content longer than this (in tokens) is truncated with a marker."""
    reminder_role: str = "user"
    """Chat role of the reminder / extension message."""
    reminder_placement: str = "message"
    """message: the reminder is its own chat message after the observation; append: it is
    appended to the observation's text (one message; small models are derailed by a second
    user message, see benchmarks/RESULTS.md "Turn control"). With no observation it is a
    message either way."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.reminder_placement not in ("message", "append"):
            raise ValueError(
                f"turns.reminder_placement: '{self.reminder_placement}' is not one of "
                "message, append"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"turns.policy: '{self.policy}' is not one of {', '.join(POLICIES)}")
        for key in ("max_turns", "max_total_tokens", "max_observation_tokens", "hard_cap"):
            if getattr(self, key) < 1:
                raise ValueError(f"turns.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_turn_tokens is not None and self.max_turn_tokens < 1:
            raise ValueError(f"turns.max_turn_tokens must be >= 1, got {self.max_turn_tokens}")
        if self.reminder_turns < 0 or self.extension_turns < 1:
            raise ValueError("turns.reminder_turns must be >= 0 and turns.extension_turns >= 1")
        if self.policy == "dynamic":
            if self.hard_cap < self.max_turns:
                raise ValueError(
                    f"turns.hard_cap ({self.hard_cap}) must be >= turns.max_turns "
                    f"({self.max_turns}) for the dynamic policy"
                )
            if not self.extension_request.strip():
                raise ValueError("turns.extension_request must be a non-empty string")


@dataclass
class TurnState:
    """Per-trajectory turn bookkeeping (JSON-able via `asdict` / `TurnState(**d)`)."""

    turns: int = 0  # assistant turns finished
    budget: int | None = None  # turns allowed now; None = unlimited
    extensions: int = 0  # extension requests granted
    refused: int = 0  # extension requests refused (at the hard cap)
    reminders: int = 0  # reminder messages injected

    @property
    def turns_left(self) -> int | None:
        return None if self.budget is None else max(self.budget - self.turns, 0)

    def to_dict(self) -> dict:
        return asdict(self)


class TurnController:
    """Applies a `TurnsConfig` to `TurnState`s. Call order per assistant turn:
    `end_turn` (counts it, handles an extension request), then `exhausted`, then `message`
    (the reminder / extension notice to inject before the next turn, if any)."""

    def __init__(self, cfg: TurnsConfig) -> None:
        cfg.validate()
        self.cfg = cfg

    def start(self) -> TurnState:
        return TurnState(budget=None if self.cfg.policy == "unlimited" else self.cfg.max_turns)

    def end_turn(self, state: TurnState, assistant_text: str) -> str | None:
        """Count a finished assistant turn. Under `dynamic`, an extension request in the text
        is granted (returns "granted") or refused at the hard cap ("refused"); else None."""
        state.turns += 1
        cfg = self.cfg
        if cfg.policy != "dynamic" or cfg.extension_request not in assistant_text:
            return None
        assert state.budget is not None
        if state.budget >= cfg.hard_cap:
            state.refused += 1
            return "refused"
        state.budget = min(state.budget + cfg.extension_turns, cfg.hard_cap)
        state.extensions += 1
        return "granted"

    def exhausted(self, state: TurnState) -> bool:
        """True when no assistant turn is left."""
        return state.budget is not None and state.turns >= state.budget

    def message(self, state: TurnState, extension: str | None) -> str | None:
        """Text to inject before the next turn: the extension outcome and/or the reminder of
        the turns left; None when there is nothing to say. Counts reminders."""
        cfg, left = self.cfg, state.turns_left
        parts = []
        if extension == "granted":
            parts.append(f"Extension granted: {cfg.extension_turns} more turn(s).")
        elif extension == "refused":
            parts.append(f"Extension refused: the limit of {cfg.hard_cap} turns is reached.")
        if left is not None and 0 < left <= cfg.reminder_turns:
            text = cfg.reminder.format(turns_left=left, turns_used=state.turns)
            if cfg.policy == "dynamic" and state.budget is not None and state.budget < cfg.hard_cap:
                text += cfg.extension_hint.format(
                    extension_turns=cfg.extension_turns, request=cfg.extension_request
                )
            parts.append(text)
            state.reminders += 1
        return " ".join(parts) if parts else None


class ChatCodec:
    """Tokenizes env messages appended to a conversation exactly as a fresh tokenization of
    the whole rendered conversation would (see the module docstring for the boundaries)."""

    _PROBE = "\x1frlsys-probe\x1f"

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": self._PROBE}]
        text = self.render(probe, False)
        at = text.rfind(self._PROBE)
        if at < 0:
            raise ValueError("the chat template does not render assistant content verbatim")
        self.assistant_suffix = text[at + len(self._PROBE) :]
        specials = {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
        }
        suffix_ids = self.encode(self.assistant_suffix)
        if suffix_ids and suffix_ids[0] in specials:
            self.end_of_turn_id: int | None = suffix_ids[0]
            eot_text = tokenizer.decode([suffix_ids[0]], skip_special_tokens=False)
            self.closing = self.assistant_suffix[len(eot_text) :]
        else:  # the template closes turns with plain text: documented boundary 3
            self.end_of_turn_id, self.closing = None, self.assistant_suffix
        eos = tokenizer.eos_token_id
        self.stop_token_ids = sorted({i for i in (self.end_of_turn_id, eos) if i is not None})
        self._defuse = [
            t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t
        ]
        self._defuse += [
            t.content
            for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
            if t.special and t.content not in self._defuse
        ]
        obs = [{"role": "user", "content": "obs"}]
        if not self.render(probe + obs, True).startswith(text):
            raise ValueError(
                "the chat template is not prefix-stable (rendering a longer conversation "
                "changes earlier turns); multi-turn token-in/token-out needs one that is"
            )

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def defuse(self, text: str) -> str:
        """Break special-token strings in env text so they tokenize as plain text."""
        for s in self._defuse:
            if s in text:
                text = text.replace(s, s[0] + "\u200b" + s[1:])
        return text

    def truncate(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """Cut `text` to at most `max_tokens` tokens: its head and a `[truncated N tokens]`
        marker (the bare head when even the marker does not fit)."""
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text, False
        marker = f"\n...[truncated {len(ids) - max_tokens} tokens]"
        keep = max_tokens - len(self.encode(marker))
        if keep < 1:
            marker, keep = "", max_tokens
        while keep > 0:  # re-encoding a decoded head can merge differently: re-check
            out = self.decode(ids[:keep]) + marker
            excess = len(self.encode(out)) - max_tokens
            if excess <= 0:
                return out, True
            keep -= excess
        return marker if len(self.encode(marker)) <= max_tokens else "", True

    def env_ids(self, messages: list[dict], new: list[dict], ended_on_eot: bool) -> list[int]:
        """Tokens for `new` env messages after a conversation ending with an assistant turn,
        up to and including the next generation prompt."""
        prev = self.render(messages, False)
        full = self.render(messages + new, True)
        if not full.startswith(prev):
            raise ValueError("chat template rendering is not prefix-stable for this conversation")
        head = self.closing if ended_on_eot else self.assistant_suffix
        return self.encode(head + full[len(prev) :])
