"""The built-in reasoning parsers: ``think``, a model's thinking between ``<think>`` and ``</think>``
(Qwen3, SmolLM3, DeepSeek-R1 distills), and ``harmony``, gpt-oss's channels, apart from the answer
(:mod:`nextoken.reasoning`)."""

from __future__ import annotations

import nextoken
from nextoken import Harmony, ThinkTags


def make_think(options=None):
    """Thinking between <think> and </think> (options: start, end: other tags)."""
    options = options or {}
    return ThinkTags(options.get("start", "<think>"), options.get("end", "</think>"))


def make_harmony(options=None):
    """gpt-oss's channels: analysis is reasoning, final the answer, a message to a function a tool call."""
    return Harmony()


@nextoken.hookimpl
def register_reasoning_parsers(register):
    register("think", make_think)
    register("harmony", make_harmony)
