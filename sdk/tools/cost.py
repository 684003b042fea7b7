"""Projecting what a workload costs: per answer, per day, per month, per year."""

from __future__ import annotations

__all__ = ["per_answer_from_bench", "per_answer_from_tokens", "project"]


def project(cost_per_answer: float, answers_per_day: float) -> dict[str, float]:
    """What ``answers_per_day`` answers at ``cost_per_answer`` each cost over time.

    >>> project(0.01, 1_000_000)["per_day"]     # $0.01 an answer, a million answers a day
    10000.0
    """
    if cost_per_answer < 0 or answers_per_day < 0:
        raise ValueError("cost per answer and answers per day must be >= 0")
    per_day = cost_per_answer * answers_per_day
    return {
        "per_answer": cost_per_answer,
        "answers_per_day": answers_per_day,
        "per_day": per_day,
        "per_month": per_day * 30,
        "per_year": per_day * 365,
    }


def per_answer_from_tokens(
    prompt_tokens: float, completion_tokens: float, input_per_million: float, output_per_million: float
) -> float:
    """What one answer costs at per-token prices (the ``per_token`` meter's rule)."""
    return prompt_tokens * input_per_million / 1e6 + completion_tokens * output_per_million / 1e6


def per_answer_from_bench(
    bench: dict, completion_tokens: float, hourly_rate: float, batch: int | None = None
) -> dict[str, float]:
    """Device cost of one answer from a ``nextoken bench --json`` run: the measured batch
    throughput (the best batch, or ``batch``) turned into device seconds per answer x an hourly rate."""
    rows = [r for r in bench.get("rows", []) if r.get("setting") == "greedy" and (batch is None or r["batch"] == batch)]
    if not rows:
        raise ValueError("the bench file has no greedy rows" + (f" at batch {batch}" if batch else ""))
    best = max(rows, key=lambda r: r["total_tokens_per_s"])
    prefill_s = best["prefill_ms"] / 1e3 / best["batch"]
    seconds = prefill_s + completion_tokens / best["total_tokens_per_s"]
    return {
        "batch": best["batch"],
        "tokens_per_s": best["total_tokens_per_s"],
        "device_seconds": seconds,
        "per_answer": seconds * hourly_rate / 3600.0,
    }
