"""Scale-out on Ray Serve: two replicas on loopback, each an engine with its own scheduler, each
copying its metrics into Ray's metrics export.

Ray is an optional extra (``pip install -e '.[ray]'``, part of ``.[dev]``); without it this module is skipped.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[ray]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nextoken_samples(metrics_port: int) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return [s for f in text_string_to_metric_families(body) if f.name.startswith("ray_nextoken_") for s in f.samples]


def test_two_replicas_serve_the_openai_api_and_export_metrics_to_ray(stories_package):
    import openai
    from ray import serve

    from nextoken import Engine
    from nextoken.serving.ray_serve import serve_ray

    port, metrics_port = _free_port(), _free_port()
    ray.init(include_dashboard=False, configure_logging=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    serve_ray(str(stories_package), port=port, replicas=2, threads=1, blocking=False, model_name="stories",
              metrics_interval=0.5)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["stories"]
        with Engine(stories_package, device="cpu") as engine:
            expected = engine.generate("Once upon a time", max_new_tokens=12).text
        for _ in range(4):                                   # spread over both replicas
            got = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=12, temperature=0)
            assert got.choices[0].text == expected
        stream = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=12, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected
        status = serve.status().applications["nextoken"].deployments["nextoken"]
        assert status.replica_states.get("RUNNING") == 2

        # Every replica's counters reach Ray's export, tagged with the replica: 5 requests of 12 tokens.
        def total(name, **labels):
            return sum(s.value for s in samples if s.name == name
                       and all(s.labels.get(k) == v for k, v in labels.items()))

        deadline = time.monotonic() + 60
        while True:
            samples = _nextoken_samples(metrics_port)
            if total("ray_nextoken_requests_total", finish_reason="length", status="finished") == 5 \
                    and total("ray_nextoken_time_to_first_token_seconds_count") == 5:
                break
            assert time.monotonic() < deadline, f"Ray's export did not reach 5 requests: {samples}"
            time.sleep(0.5)
        assert total("ray_nextoken_generation_tokens_total") == 60
        assert total("ray_nextoken_prompt_tokens_total") > 0
        assert total("ray_nextoken_request_duration_seconds_bucket", le="+Inf") == 5
        assert total("ray_nextoken_time_to_first_token_seconds_sum") > 0
        replicas = {s.labels["replica"] for s in samples if s.name == "ray_nextoken_requests_total"}
        assert replicas and all(s.labels.get("deployment") == "nextoken" for s in samples
                                if s.name == "ray_nextoken_requests_total")
        assert {s.labels["replica"] for s in samples if s.name == "ray_nextoken_kv_buffer_bytes"} >= replicas
    finally:
        serve.shutdown()
        ray.shutdown()
