"""Replaying a request's record (:mod:`nextoken.records`): the same tokens, or the first step
where they differ, both tokens and log-probabilities, and which recorded setting differs.

    from nextoken.tools.replay import replay
    print(replay("record.json").line())            # or replay(record, engine=engine)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine import Engine
from ..errors import InvalidRequestError
from ..records import RECORD_VERSION, engine_settings, pieces, version_of
from ..types import SamplingParams

__all__ = ["replay", "ReplayReport"]


@dataclass
class ReplayReport:
    """What a replay found: ``identical`` tokens, or the ``step`` of the first difference with
    both tokens and log-probabilities, and the recorded ``differences`` in settings."""

    identical: bool
    steps: int
    step: int | None = None
    recorded_token: int | None = None
    replayed_token: int | None = None
    recorded_logprob: float | None = None
    replayed_logprob: float | None = None
    differences: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """One line for people."""
        if self.identical:
            head = f"identical: {self.steps} tokens"
        else:
            lp = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            head = (f"diverges at step {self.step}: recorded token {self.recorded_token} (logprob "
                    f"{lp(self.recorded_logprob)}), replayed {self.replayed_token} (logprob {lp(self.replayed_logprob)})")
        return head + ("; differs: " + "; ".join(self.differences) if self.differences else "")


def replay(record: dict[str, Any] | str | Path, engine: Any = None, package: str | Path | None = None) -> ReplayReport:
    """Run ``record`` again on ``engine`` (or a new engine on ``package``, else the recorded one)."""
    if not isinstance(record, dict):
        try:
            record = json.loads(Path(record).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"cannot read the record {record}: {exc}") from None
    if record.get("nextoken_record") != RECORD_VERSION:
        raise InvalidRequestError(f"not a nextoken record of version {RECORD_VERSION}")
    own = engine is None
    if own:
        engine = Engine(package or record["package"]["path"])
    try:
        params = SamplingParams(**{**record["params"], "top_logprobs": record["params"].get("top_logprobs") or 0})
        generation = engine.start(record["prompt_token_ids"], params)
        got = generation.completions()[0]
        differences = _differences(record, engine, generation.pipeline)
    finally:
        if own:
            engine.close()
    want, have = record["token_ids"], got.token_ids
    logprobs = [lp.logprob for lp in got.logprobs or []]
    for step, (a, b) in enumerate(zip(want, have)):
        if a != b:
            recorded = record.get("logprobs")
            return ReplayReport(False, len(have), step, a, b, recorded[step] if recorded else None,
                                logprobs[step] if step < len(logprobs) else None, differences)
    if len(want) != len(have):
        step = min(len(want), len(have))
        return ReplayReport(False, len(have), step, want[step] if step < len(want) else None,
                            have[step] if step < len(have) else None, differences=differences)
    return ReplayReport(True, len(have), differences=differences)


def _differences(record: dict[str, Any], engine: Any, pipeline: Any) -> list[str]:
    out = []
    params = record["params"]
    if params.get("seed") is None and (params.get("temperature") or 0) > 0:
        out.append("the request sampled without a seed: each run draws other numbers")
    checksums = dict(engine.manifest.checksums)
    changed = sorted(name for name in set(checksums) | set(record["package"]["checksums"])
                     if checksums.get(name) != record["package"]["checksums"].get(name))
    if changed:
        out.append(f"the package's files ({', '.join(changed)})")
    now = engine_settings(engine)
    out += [f"{key}: recorded {value!r}, now {now.get(key)!r}" for key, value in record["engine"].items()
            if now.get(key) != value]
    recorded = {(kind, name): (plugin, version) for kind, name, plugin, _, version in record["plugins"]}
    for piece in pieces(pipeline):
        was = recorded.get((piece.kind, piece.name))
        version = version_of(piece.distribution)
        if was is not None and (was[0], was[1]) != (piece.plugin, version):
            out.append(f"{piece.kind} {piece.name}: recorded {was[0]} {was[1]}, now {piece.plugin} {version}")
    return out
