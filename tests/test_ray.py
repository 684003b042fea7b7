"""Scale-out on Ray Serve: two replicas on loopback, each an engine with its own scheduler.

Ray is an optional extra (``pip install -e '.[ray]'``); without it this module is skipped.
"""

from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[ray]')")


def test_two_replicas_serve_the_openai_api(stories_package):
    import openai
    from ray import serve

    from nextoken import Engine
    from nextoken.serving.ray_serve import serve_ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_ray(str(stories_package), port=port, replicas=2, threads=1, blocking=False, model_name="stories")
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
    finally:
        serve.shutdown()
        ray.shutdown()
