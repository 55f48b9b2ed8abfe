"""Rewards used by tests, loaded by file path the way a user's would be."""


def length_reward(prompt: str, response: str, scale: float = 40.0, **meta) -> dict:
    """Longer responses score higher (a dense signal even for a random tiny model)."""
    return {"score": min(len(response) / scale, 1.0), "chars": float(len(response))}


def broken_reward(prompt: str, response: str, **meta) -> float:
    raise RuntimeError("this reward always fails")
