"""Rewards used by tests, loaded by file path the way a user's would be."""


def length_reward(prompt: str, response: str, scale: float = 40.0, **meta) -> dict:
    """Longer responses score higher (a dense signal even for a random tiny model)."""
    return {"score": min(len(response) / scale, 1.0), "chars": float(len(response))}


def broken_reward(prompt: str, response: str, **meta) -> float:
    raise RuntimeError("this reward always fails")


def crash_once(prompt: str, response: str, marker: str = "", **meta) -> dict:
    """`length_reward`, except that the first call to find `marker` (a file) claims it and
    SIGKILLs its own process: a rollout worker dying in the middle of a generate call."""
    import os
    import signal

    if marker:
        try:
            os.rename(marker, marker + ".taken")  # atomic: exactly one caller wins
        except FileNotFoundError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return length_reward(prompt, response)
