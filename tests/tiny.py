"""Shared test helper: fresh copies of the zoo's tiny random MoEs, built once per test session."""

import copy
import functools

from mxmoe.models.zoo import tiny_model


@functools.lru_cache(maxsize=None)
def _built(name):
    return tiny_model(name)


def fresh(name="tiny-qwen2-moe"):
    """A deep copy of a tiny random model, so a test may modify it in place."""
    return copy.deepcopy(_built(name))
