"""Projecting what a workload costs: per answer, per day, per month, per year."""

from __future__ import annotations

__all__ = ["project"]


def project(cost_per_answer: float, answers_per_day: float) -> dict[str, float]:
    """What ``answers_per_day`` answers at ``cost_per_answer`` each cost over time.

    >>> project(0.01, 1_000_000)["per_day"]     # $0.01 an answer, a million answers a day
    10000.0
    """
    if cost_per_answer < 0 or answers_per_day < 0:
        raise ValueError("cost per answer and answers per day must be >= 0")
    per_day = cost_per_answer * answers_per_day
    return {"per_answer": cost_per_answer, "answers_per_day": answers_per_day, "per_day": per_day,
            "per_month": per_day * 30, "per_year": per_day * 365}
