"""Metrics: what the scheduler did and holds, in Python (``scheduler.metrics()``) and at the
server's ``GET /metrics`` in Prometheus' text format (read back with prometheus_client's parser),
behind the API key; counters move as requests run, labels stay bounded."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import nextoken
from helpers import serving
from nextoken import Scheduler

KEY = "metrics-key"


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, suffix: str = "", **labels) -> float:
    family = families[name]
    return sum(
        s.value
        for s in family.samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_the_scheduler_counts_what_it_did(llama_engine):
    scheduler = Scheduler(llama_engine, max_batch=4)
    handles = [scheduler.submit("Hello there", max_new_tokens=5, ignore_eos=True) for _ in range(3)]
    cancelled = scheduler.submit("Bye", max_new_tokens=50, ignore_eos=True)
    cancelled.cancel()
    while scheduler.step():
        pass
    m = scheduler.metrics()
    assert m["requests"] == {"cancelled/cancelled": 1, "length/finished": 3}
    assert m["generation_tokens"] == 15
    assert m["prompt_tokens"] == 3 * handles[0].result().usage.prompt_tokens + cancelled.result().usage.prompt_tokens
    assert m["time_to_first_token_seconds"]["count"] == 3 and m["inter_token_latency_seconds"]["count"] == 3
    assert m["running"] == 0 and m["waiting"] == 0 and m["slots"] == 4
    choices = scheduler.submit("Hello there", max_new_tokens=3, ignore_eos=True, n=3, temperature=0.8, seed=1)
    while scheduler.step():
        pass
    m = scheduler.metrics()  # a request of three choices counts once
    assert m["requests"]["length/finished"] == 4 and m["generation_tokens"] == 15 + 9
    assert m["time_to_first_token_seconds"]["count"] == 4 and len(choices.results()) == 3


def test_metrics_endpoint(tiny_llama):
    class Broken:
        @nextoken.hookimpl
        def register_logits_processors(self, register):
            def make(params, options):
                def fail(logits, state):
                    raise RuntimeError("no")

                return fail

            register("broken", make)

    options = {
        "cost_meters": {"per_token": {"output_per_million": 1e6}},
        "extra_plugins": [Broken()],
        "prefix_cache_bytes": 1 << 20,
    }
    with serving(tiny_llama[1], "tiny", api_key=KEY, engine_options=options) as (client, _engine, _scheduler, base):
        assert httpx.get(f"{base}/metrics").status_code == 401  # behind the API key
        before = _families(httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text)
        assert _value(before, "nextoken_requests", "_total") == 0
        for i in range(3):
            client.completions.create(
                model="tiny",
                prompt="Hello " * 20 + str(i),
                max_tokens=4,
                temperature=0,
                extra_body={"nextoken": {"ignore_eos": True}, **({"priority": -1} if i == 0 else {})},
            )
        with pytest.raises(openai.InternalServerError):  # a plugin that fails is the server's 500
            client.completions.create(
                model="tiny", prompt="x", max_tokens=2, extra_body={"nextoken": {"processors": ["broken"]}}
            )
        text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        after = _families(text)
        assert _value(after, "nextoken_requests", "_total", finish_reason="length", status="finished") == 3
        assert _value(after, "nextoken_requests", "_total", status="failed") == 1
        assert _value(after, "nextoken_generation_tokens", "_total") == 12
        assert _value(after, "nextoken_time_to_first_token_seconds", "_count") == 3
        errors = {s.labels["plugin"]: s.value for s in after["nextoken_plugin_errors"].samples}
        assert [(name.rsplit(".", 1)[-1], n) for name, n in errors.items()] == [("Broken", 1)]
        assert _value(after, "nextoken_cost", "_total", meter="per_token", currency="USD") == pytest.approx(12.0)
        assert _value(after, "nextoken_prefix_cache_hits", "_total") >= 1
        assert "nextoken_requests_running" in after and "nextoken_kv_buffer_bytes" in after
        # priorities are counted by class (vLLM's top-level field: -1 is high), never by value
        assert _value(after, "nextoken_requests_by_priority", "_total", priority="high") == 1
        assert _value(after, "nextoken_requests_by_priority", "_total", priority="normal") == 2
        assert _value(after, "nextoken_time_to_first_token_by_priority_seconds", "_count", priority="high") == 1
        assert _value(after, "nextoken_requests_preempted_for_priority", "_total") == 0
        labels = {k for f in after.values() for s in f.samples for k in s.labels}
        assert labels <= {
            "finish_reason",
            "status",
            "plugin",
            "meter",
            "currency",
            "le",
            "priority",
        }  # none per request
        assert {s.labels["priority"] for f in after.values() for s in f.samples if "priority" in s.labels} <= {
            "high",
            "normal",
            "low",
        }


def test_a_histogram_copied_by_its_changes_keeps_buckets_and_count():
    """Ray's metrics export takes observations, not buckets: the mirror observes each bucket's new
    observations at a value inside that bucket, so the copy's buckets and count equal the original's."""
    import random

    from nextoken.metrics import LATENCY_BUCKETS, Histogram
    from nextoken.serving.ray_serve import in_buckets

    rng = random.Random(0)
    original, copy = Histogram(LATENCY_BUCKETS), Histogram(LATENCY_BUCKETS)
    before_counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for batch in (
        [0.003, 0.2, 0.2, 7.0],
        [rng.expovariate(1.0) for _ in range(50)],
        [500.0, 0.01, 0.01],
        [],
        [LATENCY_BUCKETS[3], 120.0, 121.0],
    ):
        for v in batch:
            original.observe(v)
        counts = [n for _, n in original.cumulative()]
        for v in in_buckets(LATENCY_BUCKETS, counts, before_counts):
            copy.observe(v)
        assert copy.cumulative() == original.cumulative()
        before_counts = counts
