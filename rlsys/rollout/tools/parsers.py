"""Tool-call parsers: assistant text in, `ToolCall`s (or parse errors) out.

A parser is any object with `parse(text) -> ParseResult`; recipes name one as `code_block`,
`json`, or `pkg.module:Class` / `path/to/file.py:Class`. A parse error is not an exception:
it comes back in `ParseResult.errors` and the env shows it to the model as an observation.

Call formats (what the system prompt should teach the model):

- `code_block` — a fenced block whose info string is the language (default `python`)::

      ```python
      print(1234 * 5678)
      ```

  becomes `ToolCall("python", {"code": "print(1234 * 5678)"})`. An opening fence without a
  closing one is a parse error. Blocks in other languages are ignored (plain prose).
- `json` — Hermes/Qwen style, one JSON object per tag::

      <tool_call>{"name": "python", "arguments": {"code": "print(2 + 2)"}}</tool_call>

  Invalid JSON, a missing `name`, non-object `arguments` or an unclosed tag are parse errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class ToolCall:
    """One requested call: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParseResult:
    """The calls found in one assistant turn, and the malformed ones as messages."""

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when the turn neither calls a tool nor tries to (a final answer)."""
        return not self.calls and not self.errors


@runtime_checkable
class ToolCallParser(Protocol):
    def parse(self, text: str) -> ParseResult:
        """Find the tool calls in `text`. Never raises for malformed input."""
        ...


class CodeBlockParser:
    """Fenced code blocks in `language` become calls to `tool` with the block as `arg`."""

    def __init__(self, language: str = "python", tool: str = "python", arg: str = "code") -> None:
        self.language, self.tool, self.arg = language, tool, arg
        lang = re.escape(language)
        # An opening fence at the start of a line with this language, up to a closing fence.
        self._block = re.compile(rf"^[ \t]*```{lang}[ \t]*\n(.*?)^[ \t]*```", re.M | re.S)
        self._open = re.compile(rf"^[ \t]*```{lang}\b", re.M)

    def parse(self, text: str) -> ParseResult:
        out = ParseResult()
        end = 0
        for m in self._block.finditer(text):
            out.calls.append(ToolCall(self.tool, {self.arg: m.group(1)}))
            end = m.end()
        if self._open.search(text, end):
            out.errors.append(
                f"unterminated ```{self.language} block: close it with ``` on its own line"
            )
        return out


class JSONToolCallParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` tags."""

    def __init__(self, open_tag: str = "<tool_call>", close_tag: str = "</tool_call>") -> None:
        self.open_tag, self.close_tag = open_tag, close_tag

    def parse(self, text: str) -> ParseResult:
        out = ParseResult()
        pos = 0
        while (start := text.find(self.open_tag, pos)) != -1:
            body_start = start + len(self.open_tag)
            stop = text.find(self.close_tag, body_start)
            if stop == -1:
                out.errors.append(f"unclosed {self.open_tag}: end the call with {self.close_tag}")
                break
            pos = stop + len(self.close_tag)
            body = text[body_start:stop].strip()
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as e:
                out.errors.append(f"tool call is not valid JSON ({e.msg} at char {e.pos})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                out.errors.append('tool call must be an object with a string "name"')
                continue
            args = obj.get("arguments", {})
            if isinstance(args, str):  # some models double-encode the arguments
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            if not isinstance(args, dict):
                out.errors.append(f'"arguments" of tool call "{obj["name"]}" must be an object')
                continue
            out.calls.append(ToolCall(obj["name"], args))
        return out


PARSERS: dict[str, type] = {"code_block": CodeBlockParser, "json": JSONToolCallParser}


def build_parser(spec: str | ToolCallParser, **kwargs: Any) -> ToolCallParser:
    """A parser from a built-in name, a `pkg.module:Class` / `file.py:Class` spec, or as is."""
    if not isinstance(spec, str):
        return spec
    if spec in PARSERS:
        return PARSERS[spec](**kwargs)
    from rlsys.reward.api import load_callable

    return load_callable(spec, "rollout.agent.parser")(**kwargs)
