"""A reward file whose own import fails: the error must say so, not 'file not found'."""

import rlsys_no_such_dependency  # noqa: F401


def fn(prompt: str, response: str, **meta) -> float:
    return 1.0
