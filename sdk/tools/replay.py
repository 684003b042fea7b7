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

__all__ = ["ReplayReport", "read_records", "replay", "replay_all"]


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
            head = (
                f"diverges at step {self.step}: recorded token {self.recorded_token} (logprob "
                f"{lp(self.recorded_logprob)}), replayed {self.replayed_token} (logprob {lp(self.replayed_logprob)})"
            )
        return head + ("; differs: " + "; ".join(self.differences) if self.differences else "")


#: what every record holds, and the type of each
_KEYS = {"package": dict, "engine": dict, "params": dict, "prompt_token_ids": list, "token_ids": list, "plugins": list}


def read_records(source: dict[str, Any] | list | str | Path) -> list[dict[str, Any]]:
    """The records of one request: a record, the list nextoken writes for n > 1, or a file of
    either; an :class:`~nextoken.InvalidRequestError` in one line saying what is wrong otherwise."""
    where = "the record"
    if isinstance(source, (str, Path)):
        where = f"the record {source}"
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"cannot read {where}: {exc}") from None
    records = source if isinstance(source, list) else [source]
    if not records:
        raise InvalidRequestError(f"{where} is an empty list")
    for i, record in enumerate(records):
        name = where if len(records) == 1 else f"{where} (choice {i})"
        if not isinstance(record, dict) or record.get("nextoken_record") != RECORD_VERSION:
            raise InvalidRequestError(f"{name} is not a nextoken record of version {RECORD_VERSION}")
        for key, kind in _KEYS.items():
            if not isinstance(record.get(key), kind):
                raise InvalidRequestError(
                    f"{name} lacks {key!r} (a JSON {'object' if kind is dict else 'list'}): not a whole nextoken record"
                )
        if not isinstance(record["package"].get("checksums"), dict):
            raise InvalidRequestError(f"{name} lacks its package's checksums: not a whole nextoken record")
    return records  # type: ignore[return-value]  # each checked to be a record dict above


def replay(record: dict[str, Any] | str | Path, engine: Any = None, package: str | Path | None = None) -> ReplayReport:
    """Run ``record`` again on ``engine`` (or a new engine on ``package``, else the recorded one);
    a file of several choices' records: the first's report (:func:`replay_all` gives each)."""
    return replay_all(record, engine, package)[0]


def replay_all(
    source: dict[str, Any] | list | str | Path, engine: Any = None, package: str | Path | None = None
) -> list[ReplayReport]:
    """Run a request's records (:func:`read_records`) again, the request once: a report per choice."""
    records = read_records(source)
    first = records[0]
    own = engine is None
    if own:
        path = package or first["package"].get("path")
        if not isinstance(path, (str, Path)):
            raise InvalidRequestError("the record names no package path; give one (--package)")
        engine = Engine(path)
    try:
        try:
            params = SamplingParams(**{**first["params"], "top_logprobs": first["params"].get("top_logprobs") or 0})
        except TypeError as exc:
            raise InvalidRequestError(f"the record's params are not this nextoken's: {exc}") from None
        generation = engine.start(first["prompt_token_ids"], params)
        completions = engine.complete(generation)
        differences = _differences(first, engine, generation.pipeline)
    finally:
        if own:
            engine.close()
    reports = []
    for i, record in enumerate(records):
        choice = record.get("choice", i)
        if not isinstance(choice, int) or not 0 <= choice < len(completions):
            raise InvalidRequestError(f"the record of choice {choice!r} names no choice of the replayed request")
        reports.append(_compare(record, completions[choice], differences))
    return reports


def _compare(record: dict[str, Any], got: Any, differences: list[str]) -> ReplayReport:
    want, have = record["token_ids"], got.token_ids
    logprobs = [lp.logprob for lp in got.logprobs or []]
    recorded = record.get("logprobs")
    for step, (a, b) in enumerate(zip(want, have)):
        if a != b:
            return ReplayReport(
                False,
                len(have),
                step,
                a,
                b,
                recorded[step] if isinstance(recorded, list) and step < len(recorded) else None,
                logprobs[step] if step < len(logprobs) else None,
                differences,
            )
    if len(want) != len(have):
        step = min(len(want), len(have))
        return ReplayReport(
            False,
            len(have),
            step,
            want[step] if step < len(want) else None,
            have[step] if step < len(have) else None,
            differences=differences,
        )
    return ReplayReport(True, len(have), differences=differences)


def _differences(record: dict[str, Any], engine: Any, pipeline: Any) -> list[str]:
    out = []
    params = record["params"]
    if params.get("seed") is None and (params.get("temperature") or 0) > 0:
        out.append("the request sampled without a seed: each run draws other numbers")
    checksums = dict(engine.manifest.checksums)
    changed = sorted(
        name
        for name in set(checksums) | set(record["package"]["checksums"])
        if checksums.get(name) != record["package"]["checksums"].get(name)
    )
    if changed:
        out.append(f"the package's files ({', '.join(changed)})")
    now = engine_settings(engine)
    out += [
        f"{key}: recorded {value!r}, now {now.get(key)!r}"
        for key, value in record["engine"].items()
        if now.get(key) != value
    ]
    recorded = {(p[0], p[1]): (p[2], p[4]) for p in record["plugins"] if isinstance(p, list) and len(p) == 5}
    for piece in pieces(pipeline):
        was = recorded.get((piece.kind, piece.name))
        version = version_of(piece.distribution)
        if was is not None and (was[0], was[1]) != (piece.plugin, version):
            out.append(f"{piece.kind} {piece.name}: recorded {was[0]} {was[1]}, now {piece.plugin} {version}")
    return out
