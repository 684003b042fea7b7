"""The built-in tool-call formats (:mod:`nextoken.toolcalls`): ``hermes`` (``<tool_call>`` blocks of
JSON: Qwen2.5/3, Hermes, SmolLM3), ``llama3_json`` (one bare call object with ``"parameters"``:
Llama 3.1-3.3) and ``mistral`` (a JSON list of calls, after ``[TOOL_CALLS]``)."""

from __future__ import annotations

import nextoken
from nextoken import ToolFormat


def make_hermes(options=None):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (options: open, close: other tags)."""
    options = options or {}
    return ToolFormat("hermes", options.get("open", "<tool_call>"), options.get("close", "</tool_call>"))


def make_llama3_json(options=None):
    """One bare ``{"name": ..., "parameters": {...}}`` object (Llama 3.x's JSON tool calling)."""
    return ToolFormat("llama3_json", arguments_key="parameters")


def make_mistral(options=None):
    """A JSON list ``[{"name": ..., "arguments": {...}}, ...]`` (Mistral's, after ``[TOOL_CALLS]``)."""
    return ToolFormat("mistral", as_list=True)


@nextoken.hookimpl
def register_tool_parsers(register):
    register("hermes", make_hermes)
    register("llama3_json", make_llama3_json)
    register("mistral", make_mistral)
