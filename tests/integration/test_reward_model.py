"""The `reward_model` reward: a sequence-classification model in its own Ray actor, shared by
scorers in several Ray actors (as rollout workers would), batching their requests."""

from __future__ import annotations

import os

import pytest
import torch

from rlsys.reward import RewardConfig, build_scorer
from rlsys.reward.scorer import RewardInput

pytestmark = pytest.mark.slow

PAIRS = [("What is 2 + 2?", f" It is {n}.") for n in range(6)]


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: str) -> str:
    """A tiny randomly initialised Llama sequence classifier on the tiny-llama tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    out = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    env = {k: os.environ[k] for k in ("RLSYS_CACHE", "HF_HOME", "HF_HUB_OFFLINE")}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": env},
    )
    yield ray
    ray.shutdown()


def _reference(path: str) -> list[float]:
    """Each text alone, unpadded: what batching and padding must not change."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for p, r in PAIRS:
            out.append(float(model(**tok(p + r, return_tensors="pt")).logits[0, 0]))
    return out


def test_reward_model_actor_scores_and_batches(ray_session, rm_path: str) -> None:
    ray = ray_session
    kwargs = {"path": rm_path, "batch_size": 4, "max_wait_s": 0.2, "num_cpus": 0}
    cfg = RewardConfig(fn="reward_model", kwargs=kwargs, timeout_s=120)
    want = _reference(rm_path)

    with build_scorer(cfg, None) as scorer:  # in the driver
        out = scorer.score([RewardInput(p, r) for p, r in PAIRS])
        actor = scorer.parts[0].reward.fn.actor
        # 6 sequences queued at once, batch_size 4: exactly two forward passes (4 + 2)
        assert ray.get(actor.stats.remote()) == {"batches": 2, "sequences": 6}
    assert scorer.errors == 0
    assert [o.score for o in out] == pytest.approx(want, abs=1e-4)
    assert len({round(x, 4) for x in want}) > 1  # the random head tells the texts apart

    class ScoringWorker:  # local, so Ray pickles it by value (tests/ is not importable there)
        """Stands in for a rollout worker: builds the recipe's scorer inside a Ray actor."""

        def __init__(self, cfg: RewardConfig) -> None:
            self.scorer = build_scorer(cfg, None)

        def score(self, pairs: list[tuple[str, str]]) -> list[float | None]:
            return [o.score for o in self.scorer.score([RewardInput(p, r) for p, r in pairs])]

    # two "rollout workers" share the one named server actor; concurrent calls share batches
    workers = [ray.remote(num_cpus=0)(ScoringWorker).remote(cfg) for _ in range(2)]
    ray.get([w.score.remote(PAIRS[:1]) for w in workers])  # set-up done in both
    before = ray.get(actor.stats.remote())
    got = ray.get([workers[0].score.remote(PAIRS[:2]), workers[1].score.remote(PAIRS[2:4])])
    after = ray.get(actor.stats.remote())
    assert got[0] + got[1] == pytest.approx(want[:4], abs=1e-4)
    assert after["sequences"] - before["sequences"] == 4
    assert after["batches"] - before["batches"] <= 2


def test_reward_model_kwargs_are_checked_before_anything_starts() -> None:
    from rlsys.config import ConfigError
    from rlsys.reward import validate_reward_config

    with pytest.raises(ConfigError, match=r"reward 'reward_model' needs keyword argument 'path'"):
        validate_reward_config(RewardConfig(fn="reward_model"), None)
    with pytest.raises(ConfigError, match=r"does not take keyword argument\(s\) pth"):
        validate_reward_config(RewardConfig(fn="reward_model", kwargs={"pth": "x"}), None)
    with pytest.raises(ConfigError, match="runs only with reward.pool: thread"):
        validate_reward_config(
            RewardConfig(fn="reward_model", kwargs={"path": "x"}, pool="process"), None
        )
