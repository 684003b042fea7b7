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
    from nextoken.serving.server import ServeOptions

    port, metrics_port = _free_port(), _free_port()
    ray.init(
        include_dashboard=False,
        configure_logging=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    # the replicas take what `nextoken serve` takes: the engine's options (a prefix cache) and the app's
    serve_ray(
        str(stories_package),
        port=port,
        replicas=2,
        blocking=False,
        model_name="stories",
        engine_options={"threads": 1, "prefix_cache_bytes": 8 << 20},
        metrics_interval=0.5,
        options=ServeOptions(api_key="k", speculative={"method": "prompt_lookup", "k": 4}),
    )
    try:
        refused = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            refused.models.list()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["stories"]
        with Engine(stories_package, device="cpu") as engine:
            expected = engine.generate("Once upon a time", max_new_tokens=12).text
        for _ in range(4):  # spread over both replicas
            got = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=12, temperature=0)
            assert got.choices[0].text == expected
        copying = client.completions.create(
            model="stories",
            prompt="Once upon a time, Lily. " * 2 + "Once upon a time,",
            max_tokens=12,
            temperature=0,
            extra_body={"nextoken": {"ignore_eos": True}},
        )
        assert copying.model_extra["nextoken"]["usage"]["proposed_tokens"] > 0  # the server's --speculative
        stream = client.completions.create(
            model="stories", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected
        status = serve.status().applications["nextoken"].deployments["nextoken"]
        assert status.replica_states.get("RUNNING") == 2

        # Every replica's counters reach Ray's export, tagged with the replica: 6 requests of 12 tokens.
        def total(name, **labels):
            return sum(
                s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        deadline = time.monotonic() + 60
        while True:
            samples = _nextoken_samples(metrics_port)
            if (
                total("ray_nextoken_requests_total", finish_reason="length", status="finished") == 6
                and total("ray_nextoken_time_to_first_token_seconds_count") == 6
            ):
                break
            assert time.monotonic() < deadline, f"Ray's export did not reach 6 requests: {samples}"
            time.sleep(0.5)
        assert total("ray_nextoken_generation_tokens_total") == 72
        assert total("ray_nextoken_prompt_tokens_total") > 0
        assert total("ray_nextoken_request_duration_seconds_bucket", le="+Inf") == 6
        assert total("ray_nextoken_time_to_first_token_seconds_sum") > 0
        replicas = {s.labels["replica"] for s in samples if s.name == "ray_nextoken_requests_total"}
        assert replicas and all(
            s.labels.get("deployment") == "nextoken" for s in samples if s.name == "ray_nextoken_requests_total"
        )
        assert {s.labels["replica"] for s in samples if s.name == "ray_nextoken_kv_buffer_bytes"} >= replicas
    finally:
        serve.shutdown()
        ray.shutdown()
