"""What a scheduler has done, counted as it ends requests: by finish reason and status, tokens in
and out, time to first token, inter-token latency and end-to-end latency (histograms, seconds),
plugin errors by plugin, cost by meter, and requests and time to first token from submission
(the queue's wait included) by priority class (``high`` below 0, ``normal`` 0, ``low`` above). ``Scheduler.metrics()`` adds what it holds now (running and
waiting requests, KV cache bytes, slot occupancy, prefix-cache hits); the server exports the same
numbers at ``GET /metrics`` in Prometheus' text format. Labels take bounded values only (finish
reasons, statuses, plugin and meter names), never a request's own.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PluginError
from .types import Completion

__all__ = [
    "LATENCY_BUCKETS",
    "PRIORITY_CLASSES",
    "TOKEN_BUCKETS",
    "Family",
    "Histogram",
    "Metrics",
    "families",
    "priority_class",
    "prometheus_text",
]

#: seconds: time to first token and end-to-end latency
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: seconds: the time between two tokens of a sequence
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: The labels priorities are counted under (a bounded set, whatever values requests bring).
PRIORITY_CLASSES = ("high", "normal", "low")


def priority_class(priority: int) -> str:
    """A request's ``priority`` as a label: ``high`` below 0, ``normal`` at 0, ``low`` above."""
    return PRIORITY_CLASSES[0 if priority < 0 else 1 if priority == 0 else 2]


@dataclass
class Histogram:
    """Observations in buckets (upper bounds, seconds), with their sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' buckets: (upper bound, observations at or under it), ``+Inf`` last."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", self.count))
        return out


class Metrics:
    """A scheduler's counters (see the module's doc); updated by the scheduler's thread, read by any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.time_to_first_token = Histogram(LATENCY_BUCKETS)
        self.inter_token_latency = Histogram(TOKEN_BUCKETS)
        self.request_duration = Histogram(LATENCY_BUCKETS)
        self.plugin_errors: collections.Counter[str] = collections.Counter()
        self.cost: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.by_priority: dict[str, int] = dict.fromkeys(PRIORITY_CLASSES, 0)
        self.ttft_by_priority = {name: Histogram(LATENCY_BUCKETS) for name in PRIORITY_CLASSES}

    def ended(self, completions: list[Completion], status: str, priority: int = 0, queued_s: float = 0.0) -> None:
        """A request of ``priority`` ended with ``completions`` (``status``: finished or cancelled)
        after waiting ``queued_s`` seconds to begin. It counts once, by its first choice's finish
        reason, time to first token and duration; tokens, inter-token latency and cost count every
        choice's."""
        if not completions:
            return
        with self._lock:
            first = completions[0].usage
            self.prompt_tokens += first.prompt_tokens
            self.requests[(completions[0].finish_reason, status)] += 1
            label = priority_class(priority)
            self.by_priority[label] += 1
            if first.completion_tokens:
                self.time_to_first_token.observe(first.time_to_first_token_ms / 1e3)
                self.ttft_by_priority[label].observe(queued_s + first.time_to_first_token_ms / 1e3)
                self.request_duration.observe(first.wall_ms / 1e3)
            for c in completions:
                u = c.usage
                self.generation_tokens += u.completion_tokens
                if u.completion_tokens > 1:
                    self.inter_token_latency.observe(
                        (u.wall_ms - u.time_to_first_token_ms) / 1e3 / (u.completion_tokens - 1)
                    )
                for name, charge in c.cost.items():
                    self.cost[(name, charge.currency)] += charge.amount

    def failed(self, error: BaseException) -> None:
        """A request failed with ``error`` (a plugin's failure is counted to the plugin)."""
        with self._lock:
            self.requests[("error", "failed")] += 1
            if isinstance(error, PluginError):
                self.plugin_errors[error.plugin or "unknown"] += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain values."""
        with self._lock:
            return {
                "requests": {f"{reason}/{status}": n for (reason, status), n in sorted(self.requests.items())},
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "time_to_first_token_seconds": _histogram(self.time_to_first_token),
                "inter_token_latency_seconds": _histogram(self.inter_token_latency),
                "request_duration_seconds": _histogram(self.request_duration),
                "plugin_errors": dict(self.plugin_errors),
                "cost": {f"{meter}/{currency}": amount for (meter, currency), amount in sorted(self.cost.items())},
                "requests_by_priority": dict(self.by_priority),
                "time_to_first_token_by_priority_seconds": {
                    name: _histogram(h) for name, h in self.ttft_by_priority.items()
                },
            }


def _histogram(h: Histogram) -> dict[str, Any]:
    return {"buckets": h.cumulative(), "sum": h.total, "count": h.count}


@dataclass(frozen=True)
class Family:
    """One exported metric: ``kind`` counter, gauge or histogram; ``name`` in base units with the
    ``nextoken_`` prefix and without ``_total``; ``samples``: (label values, value), a histogram's
    value being ``{"buckets": [(upper bound, cumulative count), ...], "sum": s, "count": n}``."""

    kind: str
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    samples: tuple[tuple[tuple[str, ...], Any], ...] = ()


_HISTOGRAMS = (
    ("time_to_first_token_seconds", "Time to the first token"),
    ("inter_token_latency_seconds", "Mean time between two tokens of a sequence"),
    ("request_duration_seconds", "Time from a request's start to its last token"),
)
_GAUGES = (
    ("requests_running", "running", "Sequences decoding now"),
    ("requests_waiting", "waiting", "Requests not decoding yet"),
    ("kv_cache_bytes", "kv_cache_bytes", "KV cache bytes the running sequences hold"),
    ("kv_buffer_bytes", "kv_buffer_bytes", "KV cache bytes allocated (paged slots: the pages written)"),
    ("kv_committed_bytes", "kv_committed_bytes", "KV cache bytes the requests in hand hold or are about to"),
    ("kv_budget_bytes", "kv_budget_bytes", "KV cache bytes the requests in hand may hold (0: no budget)"),
    ("slots", "slots", "KV slots"),
    ("slots_used", "slots_used", "KV slots in use"),
)


def families(m: dict[str, Any]) -> list[Family]:
    """``Scheduler.metrics()`` as the families every exporter writes (the server's ``/metrics``,
    Ray's metrics export): one table of names, docs and labels."""
    out = [
        Family(
            "counter",
            "nextoken_requests",
            "Requests ended, by finish reason and status",
            ("finish_reason", "status"),
            tuple((tuple(k.split("/", 1)), n) for k, n in m["requests"].items()),
        ),
        Family(
            "counter", "nextoken_prompt_tokens", "Prompt tokens of ended requests", samples=(((), m["prompt_tokens"]),)
        ),
        Family("counter", "nextoken_generation_tokens", "Tokens generated", samples=(((), m["generation_tokens"]),)),
        Family(
            "counter",
            "nextoken_requests_preempted",
            "Running requests preempted, for KV memory or for a request of an earlier rank",
            samples=(((), m["preempted"]),),
        ),
        Family(
            "counter",
            "nextoken_requests_preempted_for_priority",
            "Of those, preempted for a waiting request of an earlier rank",
            samples=(((), m["preempted_for_priority"]),),
        ),
        Family(
            "counter",
            "nextoken_requests_preempted_cache_kept",
            "Of those, kept a copy of their KV cache (short of a row, not of bytes): only their last "
            "token runs when they come back",
            samples=(((), m["preempted_cache_kept"]),),
        ),
        Family(
            "counter",
            "nextoken_requests_by_priority",
            "Requests ended, by priority class (high: below 0, normal: 0, low: above)",
            ("priority",),
            tuple(((name,), n) for name, n in m["requests_by_priority"].items()),
        ),
        Family(
            "histogram",
            "nextoken_time_to_first_token_by_priority_seconds",
            "Time from submission to the first token (the queue's wait included), by priority class",
            ("priority",),
            tuple(((name,), h) for name, h in m["time_to_first_token_by_priority_seconds"].items()),
        ),
    ]
    out += [Family("histogram", f"nextoken_{name}", doc, samples=(((), m[name]),)) for name, doc in _HISTOGRAMS]
    out += [
        Family(
            "counter",
            "nextoken_plugin_errors",
            "Requests failed by a plugin",
            ("plugin",),
            tuple(((plugin,), n) for plugin, n in m["plugin_errors"].items()),
        ),
        Family(
            "counter",
            "nextoken_cost",
            "Cost charged by each meter",
            ("meter", "currency"),
            tuple((tuple(k.split("/", 1)), amount) for k, amount in m["cost"].items()),
        ),
    ]
    out += [Family("gauge", f"nextoken_{name}", doc, samples=(((), m[key]),)) for name, key, doc in _GAUGES]
    prefix = m.get("prefix_cache")
    if prefix is not None:
        out += [
            Family(
                "counter",
                "nextoken_prefix_cache_hits",
                "Prompts that reused a cached prefix",
                samples=(((), prefix["hits"]),),
            ),
            Family(
                "counter", "nextoken_prefix_cache_misses", "Prompts that found none", samples=(((), prefix["misses"]),)
            ),
            Family(
                "counter",
                "nextoken_prefix_cache_tokens",
                "Prompt tokens reused",
                samples=(((), prefix["cached_tokens"]),),
            ),
            Family(
                "gauge", "nextoken_prefix_cache_bytes", "Bytes the prefix cache holds", samples=(((), prefix["bytes"]),)
            ),
        ]
    return out


def prometheus_text(metrics: dict[str, Any], by_model: Mapping[str, dict[str, Any]] | None = None) -> tuple[bytes, str]:
    """``metrics`` (what ``Scheduler.metrics()`` returns) in Prometheus' text format, and its content
    type; or, given ``by_model`` (model name -> its metrics; ``metrics`` then unused), every model's
    samples under a ``model`` label. Needs prometheus_client (the ``serve`` extra): ImportError
    without it."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
    sources = [((), (), metrics)] if by_model is None else [(("model",), (name,), m) for name, m in by_model.items()]

    def collect():
        merged: dict[str, Any] = {}
        for label, value, m in sources:
            for family in families(m):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = kinds[family.kind](
                        family.name, family.doc, labels=[*label, *family.labels]
                    )
                for labels, sample in family.samples:
                    if family.kind == "histogram":
                        out.add_metric([*value, *labels], sample["buckets"], sample["sum"])
                    else:
                        out.add_metric([*value, *labels], sample)
        yield from merged.values()

    class _Now:
        def collect(self):
            return collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Now())
    return generate_latest(registry), CONTENT_TYPE_LATEST
