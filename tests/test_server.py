"""The OpenAI-compatible server, tested with the official openai client on loopback."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest

import nextoken
from nextoken import Engine, Scheduler
from nextoken.server import create_app
from helpers import with_chat_template

KEY = "test-key"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    import uvicorn

    pkg = with_chat_template(tiny_llama[1], tmp_path_factory.mktemp("served") / "tiny", TEMPLATE)
    engine = Engine(pkg, device="cpu", plugins=False)
    scheduler = Scheduler(engine, max_batch=4).start()
    port = _free_port()
    config = uvicorn.Config(create_app(scheduler, "tiny", api_key=KEY), host="127.0.0.1", port=port, log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield client, engine, scheduler, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    scheduler.close()
    engine.close()


def test_models(server):
    client, *_ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_equals_the_engine(server):
    client, engine, *_ = server
    got = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                    extra_body={"nextoken": {"ignore_eos": True}})
    expected = engine.generate("Hello there", max_new_tokens=12, ignore_eos=True)
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.model_extra["nextoken"]["usage"]["completion_tokens"] == 12


def test_streaming_completion_with_usage(server):
    client, engine, *_ = server
    stream = client.completions.create(model="tiny", prompt="Stream me", max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"nextoken": {"ignore_eos": True}})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == engine.generate("Stream me", max_new_tokens=10, ignore_eos=True).text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_and_chat_streaming(server):
    client, engine, *_ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"nextoken": {"ignore_eos": True}})
    expected = engine.chat(messages, max_new_tokens=8, ignore_eos=True)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == expected.text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"nextoken": {"ignore_eos": True}})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_and_nextoken_extras(server):
    client, engine, *_ = server
    kw = dict(model="tiny", prompt="Sample", max_tokens=10, temperature=0.9, seed=5,
              extra_body={"nextoken": {"top_k": 20, "ignore_eos": True, "cost_meters": {"per_token": {"output_per_million": 1e6}}}})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text == engine.generate("Sample", max_new_tokens=10, temperature=0.9, seed=5, top_k=20,
                                                ignore_eos=True).text
    assert a.model_extra["nextoken"]["cost"]["per_token"]["amount"] == pytest.approx(10.0)


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt="x", temperature=-1), "temperature must be >= 0"),
    (dict(prompt="x", max_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompt="x", n=2), "only n=1"),
    (dict(prompt="x", extra_body={"nextoken": {"bogus": 1}}), "unknown nextoken parameter"),
    (dict(prompt="x" * 400), "context window"),
    (dict(prompt="x", extra_body={"nextoken": {"strategy": "beam"}}), "unknown strategy"),
])
def test_client_mistakes_are_openai_shaped_400s(server, kwargs, words):
    client, *_ = server
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", **kwargs)
    assert words in err.value.body["message"] and err.value.body["type"] == "invalid_request_error"


def test_auth_model_and_body_limits(server):
    client, _, _, base = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    big = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     content=b"{" + b" " * (2 << 20) + b"}")
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "tiny", "messages": "not a list"})
    assert bad.status_code == 400 and "messages must be" in bad.json()["error"]["message"]


class Slow:
    """A stop condition that never stops and takes 20 ms a step: a request that lasts seconds."""

    @nextoken.hookimpl
    def register_stop_conditions(self, register):
        def make(params, options):
            return lambda tokens, state: time.sleep(0.02)
        register("slow", make)


def test_a_client_that_disconnects_cancels_its_request(server):
    client, engine, scheduler, base = server
    if "slow" not in engine.plugins.provided("stop_condition"):
        engine.register(Slow(), "slow")
    cancelled = scheduler.ended["cancelled"]
    with httpx.stream("POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "long one", "max_tokens": 120, "stream": True,
                            "nextoken": {"ignore_eos": True, "stop_conditions": ["slow"]}}, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    for _ in range(100):
        if scheduler.running == 0:
            break
        time.sleep(0.05)
    assert scheduler.running == 0 and scheduler.ended["cancelled"] == cancelled + 1
    assert client.completions.create(model="tiny", prompt="after", max_tokens=3, temperature=0).usage.completion_tokens >= 1


def test_health_needs_no_key_and_answers_token_ids(server):
    client, engine, scheduler, base = server
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": "tiny", "running": scheduler.running, "waiting": scheduler.waiting,
                             "ended": scheduler.ended, "max_sequence_length": 128}
    got = client.completions.create(model="tiny", prompt="ids", max_tokens=5, temperature=0,
                                    extra_body={"nextoken": {"ignore_eos": True}})
    assert got.model_extra["nextoken"]["token_ids"] == engine.generate("ids", max_new_tokens=5, ignore_eos=True).token_ids
