"""The custom rewards of the README's reward section, verbatim (tested by test_reward_scorer)."""

import rlsys.reward


@rlsys.reward(name="concise")
def concise(prompt: str, response: str, max_words: int = 200, **meta) -> dict:
    """Per sample: full marks up to max_words, then shrinking; logs the word count."""
    words = len(response.split())
    return {"score": min(1.0, max_words / max(words, 1)), "words": words}


@rlsys.reward(name="no_repeats", batched=True)
class NoRepeats:
    """Batched class: penalise responses that repeat an earlier one of the same batch."""

    def __init__(self, penalty: float = 1.0) -> None:
        self.penalty = penalty  # cheap: built in every process that scores

    def setup(self) -> None:
        self.normalise = str.casefold  # heavy set-up (a model, a client) goes here

    def __call__(self, samples: list) -> list[float]:
        seen, out = set(), []
        for s in samples:
            text = self.normalise(s.meta["response_text"].strip())
            out.append(-self.penalty if text in seen else 0.0)
            seen.add(text)
        return out
