"""The built-in reasoning parser: ``think``, a model's thinking between ``<think>`` and ``</think>``
(Qwen3, SmolLM3, DeepSeek-R1 distills), apart from its answer (:mod:`nextoken.reasoning`)."""

from __future__ import annotations

import nextoken
from nextoken import ThinkTags


def make_think(options=None):
    """Thinking between <think> and </think> (options: start, end: other tags)."""
    options = options or {}
    return ThinkTags(options.get("start", "<think>"), options.get("end", "</think>"))


@nextoken.hookimpl
def register_reasoning_parsers(register):
    register("think", make_think)
