"""Recipe loading: each user mistake gives its message and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.config import (
    ConfigError,
    RecipeConfig,
    load_recipe,
    rollout_device,
    trainer_device,
)

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlsys.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "override, needle",
    [
        ("trainer.lrr=1e-5", "unknown key 'trainer.lrr'. Did you mean 'trainer.lr'?"),
        ("rollout.n_sample_per_prompt=4", "Did you mean 'rollout.n_samples_per_prompt'?"),
        ("trainer.lr=fast", "bad value for 'trainer.lr'"),
        ("steps=[1,2]", "bad value for 'steps'"),
        ("trainer.lr=-1e-6", "trainer.lr must be > 0, got -1e-06"),
        ("rollout.n_samples_per_prompt=1", "must be >= 2 for GRPO"),
        ("rollout.top_p=1.5", "rollout.top_p must be in (0, 1]"),
        (
            "algorithm.advantage=grop",
            "'grop' is not one of grpo, rloo, reinforce_pp, remax, gae. Did you mean 'grpo'?",
        ),
        (
            "algorithm.policy_loss=clip",
            "'clip' is not one of clipped, reinforce, gspo, cispo. Did you mean 'clipped'?",
        ),
        ("model.path=/no/such/model", "neither a zoo model"),
        ("model.path=recipes", "'recipes' has no config.json"),  # a folder, not a model
        ("trainer", "is not of the form key=value"),
        ("trainer.device=gpu", "trainer.device: 'gpu' is not one of auto, cpu, cuda"),
        (
            "trainer.logprob_backend=hybird",
            "'hybird' is not one of auto, triton, hybrid, torch. Did you mean 'hybrid'?",
        ),
        ("trainer.device=cuda", "trainer.device=cuda needs a GPU for each trainer rank"),
        ("rollout.device=cuda", "rollout.device=cuda needs a GPU for each rollout worker"),
        ("data.path=x.jsonl", "data.path is read only with data.task=null"),
        ("rollout.agent.env=foo", "rollout.agent.env: 'foo' is not `tools`"),
        ("rollout.agent.env=nope.py:Env", "rollout.agent.env 'nope.py:Env': file not found"),
        ("cluster.address=http://localhost", "'http://localhost' is not host:port"),
        ("cluster.address=127.0.0.1:1", "nothing answers at 127.0.0.1:1"),
        ("logging.wandb.mode=off", "YAML reads off/on/no/yes as a boolean"),
        ("trainer.lora.rank=-4", "trainer.lora.rank must be >= 0, got -4"),
    ],
)
def test_bad_override_exits_2_with_message(override: str, needle: str) -> None:
    r = _cli("train", "recipes/quickstart.yaml", override)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "targets, needle",
    [
        ("[q_proj,q_prj]", "q_prj is not a linear layer of"),
        ("[lm_head]", "lm_head cannot take an adapter"),
    ],
)
def test_bad_lora_targets_exit_2_before_any_actor(tmp_path: Path, targets: str, needle) -> None:
    run = tmp_path / "run"
    r = _cli(
        "train",
        "recipes/quickstart.yaml",
        "trainer.lora.rank=8",
        f"trainer.lora.targets={targets}",
        f"logging.run_dir={run}",
    )
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert "it has down_proj, gate_proj" in r.stderr or "lm_head" in targets
    assert not run.exists()  # nothing started


@pytest.mark.parametrize("device", ["trainer.device=cpu", "trainer.device=auto"])
def test_triton_logprob_backend_on_a_cpu_trainer_exits_2(device: str) -> None:
    # auto: no GPU in cluster.trainer_resources (the default) resolves to the CPU
    r = _cli("train", "recipes/quickstart.yaml", "trainer.logprob_backend=hybrid", device)
    assert r.returncode == 2, r.stderr
    assert "trainer.logprob_backend=hybrid runs Triton kernels on a GPU" in r.stderr
    assert "Traceback" not in r.stderr


def test_triton_logprob_backend_with_a_trainer_gpu_validates() -> None:
    from rlsys.config import load_recipe

    over = ["trainer.logprob_backend=triton", "cluster.trainer_resources={CPU: 1, GPU: 1}"]
    assert load_recipe(ROOT / "recipes/quickstart.yaml", over).trainer.logprob_backend == "triton"


def test_missing_recipe_file() -> None:
    r = _cli("train", "recipes/does_not_exist.yaml")
    assert r.returncode == 2
    assert "recipe file not found: recipes/does_not_exist.yaml" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_key_in_yaml_and_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.7\n")
    r = _cli("train", str(bad))
    assert r.returncode == 2
    assert "unknown key 'rollout.temprature'. Did you mean 'rollout.temperature'?" in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("rollout: [unclosed\n")
    r = _cli("train", str(broken))
    assert r.returncode == 2 and "cannot parse" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_file(tmp_path: Path) -> None:
    r = _cli("train", "recipes/quickstart.yaml", "data.task=null", "data.path=nope.jsonl")
    assert r.returncode == 2
    assert "data.path: file not found: nope.jsonl" in r.stderr


def test_print_config_shows_resolved_overrides() -> None:
    r = _cli("train", "recipes/quickstart.yaml", "--print-config", "rollout.temperature=0.5")
    assert r.returncode == 0, r.stderr
    assert "temperature: 0.5" in r.stdout
    assert "name: quickstart" in r.stdout


def test_help_and_version() -> None:
    r = _cli("--help")
    assert r.returncode == 0 and "train" in r.stdout
    r = _cli("train", "--help")
    assert r.returncode == 0 and "--print-config" in r.stdout and "key=value" in r.stdout
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("rlsys ")


def test_interpolation_and_types(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("steps: 3\nname: run-${steps}\nrollout:\n  prompts_per_step: ${steps}\n")
    cfg = load_recipe(p, ["steps=5"])
    assert isinstance(cfg, RecipeConfig)
    assert cfg.name == "run-5" and cfg.rollout.prompts_per_step == 5
    assert isinstance(cfg.trainer.lr, float)


def test_defaults_are_valid() -> None:
    cfg = load_recipe(None)
    assert cfg.algorithm.advantage == "grpo" and cfg.rollout.n_samples_per_prompt >= 2


def test_error_is_config_error_in_process() -> None:
    with pytest.raises(ConfigError, match="trainer.lr must be > 0"):
        load_recipe(None, ["trainer.lr=0"])


def test_rollout_threads_default_per_mode_and_cluster() -> None:
    """Async on one node: rollout workers get 1 thread (the trainer keeps every core); on
    several nodes, or on-policy, `threads_per_actor`; an explicit value always wins."""
    from rlsys.config import rollout_threads

    sync = load_recipe(None, ["cluster.threads_per_actor=4"])
    assert rollout_threads(sync, nodes=1) == 4
    asy = load_recipe(None, ["rollout.mode=async", "cluster.threads_per_actor=4"])
    assert rollout_threads(asy, nodes=1) == 1
    assert rollout_threads(asy, nodes=2) == 4
    assert rollout_threads(load_recipe(None, ["rollout.mode=async"]), nodes=3) is None
    pinned = load_recipe(None, ["rollout.mode=async", "cluster.rollout_threads=3"])
    assert rollout_threads(pinned, nodes=1) == 3
    with pytest.raises(ConfigError, match="cluster.rollout_threads must be > 0"):
        load_recipe(None, ["cluster.rollout_threads=0"])


def test_devices_follow_the_resources() -> None:
    assert trainer_device(load_recipe(None)) == "cpu"
    gpu = "cluster.trainer_resources={CPU: 1, GPU: 1}"
    assert trainer_device(load_recipe(None, [gpu])) == "cuda"
    assert trainer_device(load_recipe(None, [gpu, "trainer.device=cpu"])) == "cpu"
    assert trainer_device(load_recipe(None, [gpu, "trainer.device=cuda"])) == "cuda"
    assert rollout_device(load_recipe(None, [gpu])) == "cpu"  # the trainer's GPU only
    rgpu = "cluster.rollout_resources={CPU: 1, GPU: 0.5}"
    assert rollout_device(load_recipe(None, [rgpu])) == "cuda"


def test_dashed_override_gets_a_hint() -> None:
    r = _cli("train", "recipes/quickstart.yaml", "--steps=5")
    assert r.returncode == 2 and "recipe overrides take no dashes: steps=5" in r.stderr


def test_a_fresh_run_never_writes_into_an_existing_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    r = _cli("train", "recipes/quickstart.yaml", f"logging.run_dir={run}")
    assert r.returncode == 2, r.stderr
    assert f"logging.run_dir: {run} already holds a run; continue it with resume=auto" in r.stderr
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(x.name for x in run.iterdir()) == ["metrics.jsonl"]
    r = _cli("train", "recipes/quickstart.yaml", f"logging.run_dir={run / 'metrics.jsonl'}")
    assert r.returncode == 2 and "is a file; pick a folder" in r.stderr


def test_a_cluster_too_small_for_the_actors_exits_2_not_hangs(tmp_path: Path) -> None:
    """A local Ray cluster of 2 CPUs cannot place a 3-CPU trainer and a 1-CPU rollout worker:
    their placement groups would wait forever. Nothing is written."""
    r = _cli(
        "train",
        "recipes/quickstart.yaml",
        "model.path=tiny-llama",
        "cluster.num_cpus=2",
        "cluster.trainer_resources={CPU: 3}",
        f"logging.run_dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2, r.stderr
    assert "the Ray cluster cannot place the actors: they need CPU 4 (has 2)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_a_reward_that_cannot_take_the_call_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "rw.py"
    f.write_text(
        "def one_arg(response):\n    return 1.0\n\n"
        "def per_sample(prompt, response, answer=None):\n    return 1.0\n\n"
        "class NoCall:\n    pass\n"
    )
    r = _cli("train", "recipes/quickstart.yaml", f"reward.fn={f}:one_arg")
    assert r.returncode == 2, r.stderr
    assert "takes (response), but a per-sample reward is called as (prompt, response" in r.stderr
    r = _cli("train", "recipes/quickstart.yaml", f"reward.fn={f}:NoCall")
    assert r.returncode == 2 and "class NoCall has no __call__ method" in r.stderr
    from rlsys.reward.api import check_call_form, load_callable

    check_call_form("per_sample", load_callable(f"{f}:per_sample"))  # the contract: passes


def test_unreadable_data_files_are_config_errors(tmp_path: Path) -> None:
    from rlsys.data import read_records

    (tmp_path / "a.json").write_text('{"prompt": "a"},\n{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match=r"a.json:1: not valid JSON .*name it .jsonl"):
        read_records(tmp_path / "a.json")
    (tmp_path / "b.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="b.parquet: not a readable Parquet file"):
        read_records(tmp_path / "b.parquet")


def test_eval_finds_the_model_folder_and_checks_out_first(tmp_path: Path, tiny_model_path) -> None:
    from rlsys.evaluate import hf_folder

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-2"
    for d in (run / "final", step / "trainer" / "hf"):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    assert hf_folder(str(run)) == run / "final"
    assert hf_folder(str(step)) == step / "trainer" / "hf"
    assert hf_folder(str(run / "final")) == run / "final"
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        hf_folder(str(run / "checkpoints"))
    # a bad --out fails before the evaluation runs, not after it
    out = tmp_path / "a-file" / "eval.json"
    (tmp_path / "a-file").write_text("")
    r = _cli("eval", "recipes/quickstart.yaml", "--checkpoint", tiny_model_path, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert f"--out {out}: cannot create its folder" in r.stderr and "eval:" not in r.stdout


def test_resuming_a_finished_run_trains_nothing(tmp_path: Path) -> None:
    from rlsys.controller import _already_done
    from rlsys.trainer.checkpoint import Resume

    ckpt = tmp_path / "checkpoints" / "step-3"
    resumed = Resume(ckpt, {"step": 3, "run_dir": str(tmp_path)})
    cfg = load_recipe(None, ["steps=3", "resume=auto"])
    assert _already_done(cfg, None, resumed) is None  # no final/: resuming writes it
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    msg = _already_done(cfg, None, resumed)
    assert msg is not None and "is at step 3 and the recipe has steps=3" in msg
    assert "steps=6" in msg
    assert _already_done(load_recipe(None, ["steps=4", "resume=auto"]), None, resumed) is None


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch) -> None:
    from rlsys.controller import run_dir_for
    from rlsys.trainer.checkpoint import _RUN

    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(None)
    first = run_dir_for(cfg, "recipes/r.yaml", None)
    first.mkdir(parents=True)
    second = run_dir_for(cfg, "recipes/r.yaml", None)
    assert second != first and not second.exists()
    assert _RUN.sub("", first.name) == _RUN.sub("", second.name) == "r"  # resume=auto finds both
