"""Request records, and replaying them: reproduce a surprising answer exactly, or learn why not.

A record is one JSON document: the package's identity (its manifest's checksums), the prompt's
token ids, the sampling parameters and seed, the plugins that made the answer (their names,
distributions and versions), the engine settings that can change numbers (provider, threads, TF32,
precision), the generated token ids, and each chosen token's log-probability. It holds the
prompt: records are written only when asked (``record=True``, ``--record FILE``, the server's
``--record-dir``), and where they are kept is the operator's to protect.

:func:`nextoken.tools.replay.replay` runs a record again (on its package, or another) and reports whether the tokens are
the same; at the first difference it names the step, both tokens and both log-probabilities, and
which recorded setting differs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .device import DeviceChoice
from .manifest import Manifest
from .types import Completion, SamplingParams

if TYPE_CHECKING:
    from .generation import Generation
    from .registry import Pipeline, Provided


class Recorded(Protocol):
    """What a record reads of the engine that ran the request (an :class:`~nextoken.Engine` is one)."""

    path: Path
    threads: int | None
    manifest: Manifest
    device: DeviceChoice


__all__ = ["RECORD_VERSION", "engine_settings", "make_record", "pieces", "records_of", "version_of"]

RECORD_VERSION = 1
#: SamplingParams fields a record leaves out (they change nothing of the tokens, or say to record)
_NOT_REPLAYED = ("record", "hook_timings", "deadline_s")


def version_of(distribution: str) -> str:
    """The installed version of a plugin's distribution ("?" where unknown)."""
    try:
        return importlib.metadata.version(distribution.split(" ")[0])
    except importlib.metadata.PackageNotFoundError:
        return "?"


def engine_settings(engine: Recorded) -> dict[str, Any]:
    """What of the engine can change the numbers: provider, threads, TF32, precision, KV dtype."""
    providers = engine.device.providers
    options = dict(providers[0][1]) if providers and isinstance(providers[0], tuple) else {}
    return {
        "device": engine.device.device,
        "provider": engine.device.provider,
        "threads": engine.threads,
        "tf32": options.get("use_tf32") == "1",
        "precision": engine.manifest.precision,
        "kv_dtype": engine.manifest.kv_dtype,
    }


def make_record(
    engine: Recorded, completion: Completion, params: SamplingParams, plugins: list[Provided], choice: int = 0
) -> dict[str, Any]:
    """The record of one completion, the request's choice ``choice`` (``plugins``: the registry
    pieces the request used)."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name not in _NOT_REPLAYED}
    fields = json.loads(json.dumps(fields, default=list))
    return {
        "nextoken_record": RECORD_VERSION,
        "package": {
            "path": str(engine.path),
            "checksums": dict(engine.manifest.checksums),
            "architecture": engine.manifest.architecture,
        },
        "engine": engine_settings(engine),
        "nextoken_version": version_of("nextoken"),
        "plugins": sorted({(p.kind, p.name, p.plugin, p.distribution, version_of(p.distribution)) for p in plugins}),
        "params": fields,
        "prompt_token_ids": list(completion.prompt_token_ids),
        "token_ids": list(completion.token_ids),
        "logprobs": [lp.logprob for lp in completion.logprobs] if completion.logprobs is not None else None,
        "finish_reason": completion.finish_reason,
        "choice": choice,
    }


def records_of(engine: Recorded, generation: Generation) -> list[dict[str, Any]]:
    """The record of each of a finished request's completions."""
    used = pieces(generation.pipeline)
    return [make_record(engine, c, generation.params, used, i) for i, c in enumerate(generation.completions())]


def pieces(pipeline: Pipeline) -> list[Provided]:
    """The registry pieces a request's pipeline resolved."""
    active = [*pipeline.processors, pipeline.strategy, *pipeline.stops, *(m for _, m in pipeline.meters)]
    if pipeline.proposer is not None:
        active.append(pipeline.proposer)
    return [a.provided for a in active]
