"""Tool calls: parsers, the ToolEnv's error handling, the python tool end to end, building
envs and tools from recipe specs, and the tool_arithmetic task."""

from __future__ import annotations

import textwrap

import pytest

from rlsys.rollout.agent import (
    AgentConfig,
    AgentLoop,
    GenOut,
    ToolEnv,
    agent_metrics,
    make_env_factory,
)
from rlsys.rollout.tools import ToolResult, build_tool
from rlsys.rollout.tools.parsers import CodeBlockParser, JSONToolCallParser, build_parser
from rlsys.rollout.tools.python_tool import PythonTool
from rlsys.rollout.turns import TurnsConfig
from rlsys.tasks import tool_arithmetic as ta
from rlsys.types import Sample

# -- parsers -------------------------------------------------------------------------------------


def test_code_block_parser():
    p = CodeBlockParser()
    text = "Let me check.\n```python\nprint(2 + 2)\n```\nand\n```python\nx = 1\nprint(x)\n```"
    r = p.parse(text)
    assert [c.arguments["code"] for c in r.calls] == ["print(2 + 2)\n", "x = 1\nprint(x)\n"]
    assert {c.name for c in r.calls} == {"python"} and not r.errors
    assert p.parse("Answer: 42").empty
    assert p.parse("```bash\nls\n```").empty  # other languages are prose
    bad = p.parse("```python\nprint(1)\n")
    assert not bad.calls and "unterminated" in bad.errors[0]


def test_json_parser():
    p = JSONToolCallParser()
    ok = p.parse('<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>')
    assert ok.calls[0].name == "python" and ok.calls[0].arguments == {"code": "print(1)"}
    double = p.parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert double.calls[0].arguments == {"a": 1}
    cases = {
        "<tool_call>{not json}</tool_call>": "not valid JSON",
        '<tool_call>{"arguments": {}}</tool_call>': 'string "name"',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>': "must be an object",
        '<tool_call>{"name": "f"}': "unclosed",
    }
    for text, msg in cases.items():
        r = p.parse(text)
        assert not r.calls and msg in r.errors[0], text
    assert p.parse("no calls").empty


def test_build_parser_by_name_and_spec():
    assert isinstance(build_parser("code_block"), CodeBlockParser)
    spec = "rlsys.rollout.tools.parsers:JSONToolCallParser"
    assert isinstance(build_parser(spec), JSONToolCallParser)
    custom = CodeBlockParser(language="py")
    assert build_parser(custom) is custom


# -- ToolEnv -------------------------------------------------------------------------------------


class Echo:
    name, description = "echo", "echo(text)"

    def __call__(self, text: str) -> str:
        return text


class Boom:
    name, description = "boom", "raises"

    def __call__(self, **kw) -> str:
        raise RuntimeError("kaput")


class Broken:
    name, description = "broken", "cannot work"

    def __call__(self, **kw) -> ToolResult:
        return ToolResult("backend is down", ok=False, fatal=True)


def json_env(**kw) -> ToolEnv:
    env = ToolEnv([Echo(), Boom(), Broken()], "json", **kw)
    env.reset({})
    return env


def call(name: str, args: str = "{}") -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


def test_tool_env_turns_every_failure_into_an_observation():
    env = json_env(max_tool_errors=0)
    r = env.step(call("echo", '{"text": "hi"}'))
    assert (
        r.observation == "Output:\nhi" and not r.done and r.info == {"tool_calls": 1, "tool_ok": 1}
    )
    assert env.step("the answer is 4").done
    cases = {
        "<tool_call>{oops</tool_call>": "Error: tool call is not valid JSON",
        call("nope"): "Error: unknown tool 'nope' (available: boom, broken, echo)",
        call("boom"): "Error: tool 'boom' raised RuntimeError: kaput",
        call("echo", '{"wrong": 1}'): "Error: tool 'echo' raised TypeError",
    }
    for text, msg in cases.items():
        r = env.step(text)
        assert r.observation.startswith(msg) and r.termination is None and not r.done, text
        assert r.info == {"tool_calls": 1.0, "tool_ok": 0.0}
    r = env.step(call("echo", '{"text": "a"}') * 6)
    assert r.info["tool_ok"] == 4 and "at most 4 tool calls" in r.observation


def test_tool_env_fatal_and_repeated_errors_end_with_tool_error():
    assert json_env().step(call("broken")).termination == "tool_error"
    env = json_env(max_tool_errors=2)
    assert env.step(call("nope")).termination is None
    assert env.step(call("nope")).termination == "tool_error"
    env = json_env(max_tool_errors=2)
    env.step(call("nope"))
    env.step(call("echo", '{"text": "ok"}'))  # a success resets the streak
    assert env.step(call("nope")).termination is None
    env.load_state_dict(env.state_dict())


def test_python_tool(tmp_path):
    tool = PythonTool(timeout_s=1.0)
    assert tool(code="print(1234 * 5678)") == ToolResult("7006652", ok=True)
    assert tool(code="x = 1").output.startswith("(no output")
    err = tool(code="1 / 0")
    assert not err.ok and not err.fatal and "ZeroDivisionError" in err.output
    slow = tool(code="while True: pass")
    assert not slow.ok and "TimeoutError: the code ran longer than 1 s" in slow.output
    assert not tool(code="").ok and not tool(code="print(1)", path="/x").ok
    bad = PythonTool(python=str(tmp_path / "no-such-python"))(code="print(1)")
    assert bad.fatal and "sandbox unavailable" in bad.output


# -- recipe specs --------------------------------------------------------------------------------


def test_env_and_tools_from_specs(tmp_path):
    f = tmp_path / "my_env.py"
    f.write_text(
        textwrap.dedent(
            """
            from rlsys.rollout.agent import StepResult

            class CountEnv:
                def __init__(self, limit):
                    self.limit = limit

                def reset(self, meta):
                    self.n = meta.get("start", 0)

                def step(self, action):
                    self.n += 1
                    return StepResult(f"n={self.n}", reward=1.0, done=self.n >= self.limit)
            """
        )
    )
    env = make_env_factory(AgentConfig(env=f"{f}:CountEnv", env_kwargs={"limit": 2}))()
    env.reset({"start": 0})
    assert not env.step("a").done and env.step("b").done
    tools_env = make_env_factory(
        AgentConfig(env="tools", tools=["python"], tool_kwargs={"python": {"timeout_s": 2.0}})
    )()
    assert (
        isinstance(tools_env, ToolEnv) and tools_env.tools["python"].sandbox.config.timeout_s == 2
    )
    assert build_tool("rlsys.rollout.tools.python_tool:PythonTool").name == "python"
    with pytest.raises(ValueError):
        make_env_factory(AgentConfig(env=None))
    for bad in ({"parser": "xml"}, {"tools": ["shell"]}, {"env_workers": 0}):
        with pytest.raises(ValueError):
            AgentConfig(env="tools", **bad).validate()


# -- tool_arithmetic, end to end -----------------------------------------------------------------


def test_tool_arithmetic_splits_and_reward():
    train, held = ta.make_task(40, 10, seed=1)
    assert (train, held) == ta.make_task(40, 10, seed=1)
    assert not {r["expression"] for r in train} & {r["expression"] for r in held}
    for r in train + held:
        assert r["answer"] == eval(r["expression"])  # noqa: S307 - our own digits
        roles = [m["role"] for m in r["prompt"]]
        assert roles == ["system"] + ["user", "assistant"] * 2 + ["user"]
        assert r["prompt"][-1]["content"] == f"What is {r['expression']}?"
    assert {"*", "+"} <= {c for r in train for c in r["expression"] if c in "*+"}
    bare = ta.make_task(3, 1, seed=1, kinds=["mul"], system_prompt=False, demo=False)[0][0]
    assert [m["role"] for m in bare["prompt"]] == ["user"] and "*" in bare["expression"]
    # the demonstration is in exactly the format the ToolEnv + code_block parser produce
    demo_call = ta.DEMO[1]["content"]
    assert ToolEnv([PythonTool()]).step(demo_call).observation == ta.DEMO[2]["content"]
    assert ta.reward("", ta.DEMO[3]["content"], answer=123 * 456) == 1.0
    with pytest.raises(ValueError):
        ta.make_task(1, 1, seed=0, kinds=["div"])
    assert ta.reward("", "Answer: 7,006,652", answer=7006652) == 1.0
    assert ta.reward("", "It is 7006652.", answer=7006652) == 1.0
    assert ta.reward("", "Answer: 7006652\nor maybe 3", answer=7006652) == 1.0
    assert ta.reward("", "```python\nprint(1234*5678)\n```", answer=1234 * 5678) == 0.0
    assert ta.reward("", "```python\nprint(7006652)\n```", answer=7006652) == 0.0
    assert ta.reward("", "no idea", answer=5) == 0.0


def test_tool_arithmetic_episode_with_python_tool(tiny_tokenizer):
    """A scripted model calls the python tool, reads the result and answers: the real sandbox
    runs the code, the observation carries its output, the final-answer reward is 1."""
    record = ta.make_task(1, 1, seed=0, kinds=["mul"])[0][0]
    expr, answer = record["expression"], record["answer"]
    script = [
        f"```python\nprint({expr}\n```",  # a syntax error first
        f"Fixed:\n```python\nprint({expr})\n```",
        f"Answer: {answer}",
    ]
    tok = tiny_tokenizer
    loop = AgentLoop.from_config(
        AgentConfig(env="tools"), TurnsConfig(policy="fixed", max_turns=4), tok, 64
    )
    text = tok.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    meta = {k: v for k, v in record.items() if k != "prompt"}  # as rlsys.data builds it
    sample = Sample(0, 0, tok(text, add_special_tokens=False)["input_ids"], meta=meta)
    traj = loop.start(sample, record["prompt"])
    eot = loop.codec.end_of_turn_id

    def generate(calls):
        assert len(calls) == 1
        ids = tok(script.pop(0), add_special_tokens=False)["input_ids"] + [eot]
        return [GenOut(ids, [-0.1] * len(ids), "stop")]

    loop.run([traj], generate)
    assert traj.termination == "done" and traj.turns.turns == 3
    new = traj.messages[len(record["prompt"]) :]
    observations = [m["content"] for m in new if m["role"] == "user"]
    assert "SyntaxError" in observations[0] and observations[1] == f"Output:\n{answer}"
    assert ta.reward("", traj.final_response, **meta) == 1.0
    m = agent_metrics([traj])
    assert m["rollout/agent/tool_calls"] == 2 and m["rollout/agent/tool_success_rate"] == 0.5
