"""The OpenAI-compatible server, tested with the official openai client on loopback."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest

import nextoken
from helpers import TEMPLATE, serving, wait_healthy, with_chat_template
from nextoken import Engine, Scheduler
from nextoken.serving.server import create_app

KEY = "test-key"


def _read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer: the head and then Content-Length bytes of body (they may come in separate
    segments), or whatever came before the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(4096)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        part = sock.recv(4096)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    pkg = with_chat_template(tiny_llama[1], tmp_path_factory.mktemp("served") / "tiny", TEMPLATE)
    with serving(pkg, "tiny", api_key=KEY) as served:
        yield served


def test_models(server):
    client, *_ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_equals_the_engine(server):
    client, engine, *_ = server
    got = client.completions.create(
        model="tiny", prompt="Hello there", max_tokens=12, temperature=0, extra_body={"nextoken": {"ignore_eos": True}}
    )
    expected = engine.generate("Hello there", max_new_tokens=12, ignore_eos=True)
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.model_extra["nextoken"]["usage"]["completion_tokens"] == 12


def test_streaming_completion_with_usage(server):
    client, engine, *_ = server
    stream = client.completions.create(
        model="tiny",
        prompt="Stream me",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"nextoken": {"ignore_eos": True}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == engine.generate("Stream me", max_new_tokens=10, ignore_eos=True).text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_and_chat_streaming(server):
    client, engine, *_ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    got = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"nextoken": {"ignore_eos": True}}
    )
    expected = engine.chat(messages, max_new_tokens=8, ignore_eos=True)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == expected.text
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"nextoken": {"ignore_eos": True}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_and_nextoken_extras(server):
    client, engine, *_ = server
    kw = dict(
        model="tiny",
        prompt="Sample",
        max_tokens=10,
        temperature=0.9,
        seed=5,
        extra_body={
            "nextoken": {"top_k": 20, "ignore_eos": True, "cost_meters": {"per_token": {"output_per_million": 1e6}}}
        },
    )
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    assert (
        a.choices[0].text
        == engine.generate("Sample", max_new_tokens=10, temperature=0.9, seed=5, top_k=20, ignore_eos=True).text
    )
    assert a.model_extra["nextoken"]["cost"]["per_token"]["amount"] == pytest.approx(10.0)


def test_n_choices_from_one_prompt(server):
    """n > 1 on both endpoints, streamed and not: choice i is the request alone with seed + i, the
    prompt counted once in the usage."""
    client, engine, *_ = server
    body = {"nextoken": {"ignore_eos": True}}
    alone = [
        engine.generate("Sample", max_new_tokens=8, temperature=0.9, seed=7 + i, ignore_eos=True) for i in range(3)
    ]
    got = client.completions.create(
        model="tiny", prompt="Sample", max_tokens=8, temperature=0.9, seed=7, n=3, extra_body=body
    )
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [a.text for a in alone]
    assert got.usage.prompt_tokens == len(alone[0].prompt_token_ids) and got.usage.completion_tokens == 24
    assert [c["token_ids"] for c in got.model_extra["nextoken"]["choices"]] == [a.token_ids for a in alone]
    stream = client.completions.create(
        model="tiny",
        prompt="Sample",
        max_tokens=8,
        temperature=0.9,
        seed=7,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=body,
    )
    texts = ["", "", ""]
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [a.text for a in alone] and chunks[-1].usage.completion_tokens == 24
    messages = [{"role": "user", "content": "Hi!"}]
    chat_alone = [
        engine.chat(messages, max_new_tokens=6, temperature=0.9, seed=3 + i, ignore_eos=True) for i in range(2)
    ]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0.9, seed=3, n=2, extra_body=body
    )
    assert [c.message.content for c in chat.choices] == [a.text for a in chat_alone]
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0.9, seed=3, n=2, stream=True, extra_body=body
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [a.text for a in chat_alone]


def test_response_format_and_nextoken_constraints(server):
    """response_format on both endpoints (json_schema, json_object), nextoken's regex and choice,
    and a schema llguidance rejects is a 400 with its message."""
    import jsonschema

    client, _engine, *_ = server
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=40,
        response_format=fmt,
        temperature=0.7,
        seed=1,
    )
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    assert chat.choices[0].finish_reason == "stop"
    done = client.completions.create(
        model="tiny", prompt="Answer:", max_tokens=40, temperature=0.7, seed=2, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(done.choices[0].text), schema)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=40,
        response_format=fmt,
        temperature=0.7,
        seed=1,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    picked = client.completions.create(
        model="tiny",
        prompt="Pick:",
        max_tokens=10,
        temperature=1.0,
        seed=4,
        extra_body={"nextoken": {"choice": ["left", "right"]}},
    )
    assert picked.choices[0].text in ("left", "right")
    digits = client.completions.create(
        model="tiny",
        prompt="Code:",
        max_tokens=10,
        temperature=1.0,
        seed=4,
        extra_body={"nextoken": {"regex": "[0-9]{4}"}},
    )
    assert re.fullmatch("[0-9]{4}", digits.choices[0].text)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi!"}],
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
        )
    assert "the JSON schema cannot be used: Invalid type: strin" in err.value.body["message"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(prompt="x", temperature=-1), "temperature: Input should be greater than or equal to 0"),
        (dict(prompt="x", max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (dict(prompt="x", n=5), "n=5 choices need 5 sequences at once, more than this scheduler's max_batch (4)"),
        (dict(prompt="x", n=0), "n: Input should be greater than or equal to 1"),
        (dict(prompt="x", extra_body={"nextoken": {"bogus": 1}}), "unknown nextoken parameter"),
        (dict(prompt="x" * 400), "context window"),
        (dict(prompt="x", extra_body={"nextoken": {"strategy": "beam"}}), "unknown strategy"),
    ],
)
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
    big = httpx.post(
        f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"{" + b" " * (2 << 20) + b"}"
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(
        f"{base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny", "messages": "not a list"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


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
    with httpx.stream(
        "POST",
        f"{base}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "tiny",
            "prompt": "long one",
            "max_tokens": 120,
            "stream": True,
            "nextoken": {"ignore_eos": True, "stop_conditions": ["slow"]},
        },
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    for _ in range(100):
        if scheduler.running == 0:
            break
        time.sleep(0.05)
    assert scheduler.running == 0 and scheduler.ended["cancelled"] == cancelled + 1
    assert (
        client.completions.create(model="tiny", prompt="after", max_tokens=3, temperature=0).usage.completion_tokens
        >= 1
    )


def test_health_needs_no_key_and_answers_token_ids(server):
    client, engine, scheduler, base = server
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200
    assert health.json() == {
        "status": "ok",
        "model": "tiny",
        "running": scheduler.running,
        "waiting": scheduler.waiting,
        "ended": scheduler.ended,
        "max_sequence_length": 128,
    }
    got = client.completions.create(
        model="tiny", prompt="ids", max_tokens=5, temperature=0, extra_body={"nextoken": {"ignore_eos": True}}
    )
    assert (
        got.model_extra["nextoken"]["token_ids"] == engine.generate("ids", max_new_tokens=5, ignore_eos=True).token_ids
    )


def _post(base, path, body=None, content=None, headers=None):
    return httpx.post(
        f"{base}{path}",
        json=body,
        content=content,
        timeout=60,
        headers={
            "Authorization": f"Bearer {KEY}",
            **({"Content-Type": "application/json"} if content is not None else {}),
            **(headers or {}),
        },
    )


MALFORMED = [
    (b"[" * 10000 + b"]" * 10000, "not valid JSON"),
    (b'{"prompt": "x", "stop": 5}', "stop"),
    (b'{"prompt": "x", "stream_options": "x"}', "stream_options"),
    (b'{"prompt": "\\ud800 lone"}', "not valid JSON"),
    (b'{"prompt": "x", "nextoken": []}', "nextoken"),
    (b'{"prompt": "x", "nextoken": {"ignore_eos": "yes"}}', "nextoken.ignore_eos"),
    (b'{"prompt": [true, false]}', "prompt"),
    (b'{"prompt": "x", "nextoken": {"cost_meters": {"per_token": {"output_per_million": "inf"}}}}', "finite number"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias keys must be token ids"),
    (b'{"prompt": "x", "logit_bias": {"5": 1000}}', "logit_bias"),
    (b'{"prompt": "x", "presence_penalty": 3}', "presence_penalty must be in [-2, 2]"),
    (
        b'{"prompt": "x", "stop": ["s"] }'.replace(b'["s"]', json.dumps([f"s{i}" for i in range(80000)]).encode()),
        "at most 64 stop strings",
    ),
    (b'"just a string"', "must be a JSON object"),
    (b'{"prompt": "x", "bogus": 1}', "bogus: unknown parameter"),
]


@pytest.mark.parametrize("content, words", MALFORMED)
def test_malformed_bodies_are_openai_shaped_400s(server, content, words):
    *_, base = server
    r = _post(base, "/v1/completions", content=content)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error", err


@pytest.mark.parametrize("field, value", [("best_of", 2), ("suffix", "end"), ("functions", [{"name": "f"}])])
def test_openai_parameters_not_built_yet_are_refused_by_name(server, field, value):
    *_, base = server
    path = "/v1/completions" if field in ("best_of", "suffix") else "/v1/chat/completions"
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = _post(base, path, {**body, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert f"{field} is not supported" in r.json()["error"]["message"]


def test_the_body_limit_holds_for_a_chunked_upload(server):
    """A chunked upload without Content-Length: the server answers 413 once it has read past the
    limit, while the client is still sending (it never reads the rest)."""
    *_, base = server
    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        chunk = b"x" * (64 << 10)
        try:
            for _ in range(40):  # 2.5 MiB of a body that would go on
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server may close once it has answered
            pass
        answer = _read_answer(sock)  # no terminating chunk was ever sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer


def test_logprobs_in_openai_shapes(server):
    client, engine, *_ = server
    want = engine.generate("Hello there", max_new_tokens=6, ignore_eos=True, top_logprobs=3)
    got = client.completions.create(
        model="tiny",
        prompt="Hello there",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"nextoken": {"ignore_eos": True}},
    )
    lp = got.choices[0].logprobs
    assert lp.tokens == [t.token for t in want.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs])
    # keyed by token text, as OpenAI's legacy shape is: two ids with one text share a key
    assert all(1 <= len(d) <= 3 for d in lp.top_logprobs) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"nextoken": {"ignore_eos": True}},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        stream=True,
        extra_body={"nextoken": {"ignore_eos": True}},
    )
    streamed = [c for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]


def test_logit_bias_penalties_and_echo_are_honoured(server):
    client, engine, *_ = server
    kw = dict(
        model="tiny", prompt="Hello there", max_tokens=8, temperature=0, extra_body={"nextoken": {"ignore_eos": True}}
    )
    plain = client.completions.create(**kw)
    ids = plain.model_extra["nextoken"]["token_ids"]
    banned = client.completions.create(**kw, logit_bias={str(ids[0]): -100})
    assert banned.model_extra["nextoken"]["token_ids"][0] != ids[0]
    assert (
        banned.model_extra["nextoken"]["token_ids"]
        == engine.generate("Hello there", max_new_tokens=8, ignore_eos=True, logit_bias={ids[0]: -100}).token_ids
    )
    penalised = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0)
    assert (
        penalised.model_extra["nextoken"]["token_ids"]
        == engine.generate(
            "Hello there", max_new_tokens=8, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0
        ).token_ids
    )
    echoed = client.completions.create(**kw, echo=True)
    assert echoed.choices[0].text == "Hello there" + plain.choices[0].text


def test_generation_config_sampling_defaults_are_the_servers(tiny_llama, tmp_path):
    from fastapi.testclient import TestClient

    pkg = tmp_path / "pkg"
    import shutil

    from helpers import rehash

    shutil.copytree(tiny_llama[1], pkg)
    cfg = json.loads((pkg / "generation_config.json").read_text())
    cfg.update(temperature=0.0)  # this model's default: greedy
    (pkg / "generation_config.json").write_text(json.dumps(cfg))
    with Engine(rehash(pkg), device="cpu", plugins=False) as engine, Scheduler(engine) as scheduler:
        with TestClient(create_app(scheduler, "tiny")) as client:
            body = {"prompt": "Hello there", "max_tokens": 6, "nextoken": {"ignore_eos": True}}
            a = client.post("/v1/completions", json=body).json()["nextoken"]["token_ids"]
            assert a == engine.generate("Hello there", max_new_tokens=6, ignore_eos=True).token_ids
            sampled = client.post("/v1/completions", json={**body, "temperature": 1.5, "seed": 1}).json()
            assert (
                sampled["nextoken"]["token_ids"]
                == engine.generate("Hello there", max_new_tokens=6, ignore_eos=True, temperature=1.5, seed=1).token_ids
            )


def test_the_cli_server_says_where_it_is_logs_requests_and_never_a_traceback_for_clients(tiny_llama, tmp_path):
    """`nextoken serve`: one start line (address, model, KV backend, the prefix cache it sized from
    the free memory), an access line a request, one line per client that goes away, no traceback
    for anything a client does; a body that stalls is a 408. --served-model-name and
    --chat-template show in /v1/models, and the template renders chats."""
    import subprocess
    import sys

    template = tmp_path / "plain.jinja"
    template.write_text(TEMPLATE)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nextoken",
            "serve",
            str(tiny_llama[1]),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--header-timeout",
            "0.5",
            "--served-model-name",
            "tiny-x",
            "--chat-template",
            str(template),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 200)
        assert (
            httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30).status_code == 200
        )
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]
        assert model["id"] == "tiny-x" and model["chat_template"] == "plain.jinja"
        chat = {"model": "tiny-x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30).status_code == 200
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "x", "stop": 5}, timeout=30).status_code == 400
        with httpx.stream(
            "POST",
            f"{base}/v1/completions",
            timeout=30,
            json={"prompt": "x", "max_tokens": 100, "stream": True, "nextoken": {"ignore_eos": True}},
        ) as r:
            next(r.iter_lines())  # the first chunk, then hang up
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # a body that never completes
            sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt"')
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # a head that never completes
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            assert sock.recv(1024) == b""  # closed by the server
        time.sleep(1.0)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"serving tiny-x ({tiny_llama[1]}) at http://127.0.0.1:{port}/v1" in out
    assert re.search(r"prefix cache \d+ MiB \(a quarter of the [\d.]+ GiB free after the plan", out), out
    assert "KV backend slots, 8 slots of 128 positions" in out
    assert '"POST /v1/completions HTTP/1.1" 200' in err and '"POST /v1/completions HTTP/1.1" 400' in err
    assert "went away" in err or "disconnected" in err
    assert "sent no whole request in 0.5 s" in err
    assert "Traceback" not in err, err


def test_a_stalled_body_is_a_408(tiny_llama):
    import uvicorn

    with Engine(tiny_llama[1], device="cpu", plugins=False) as engine, Scheduler(engine) as scheduler:
        port = _free_port()
        srv = uvicorn.Server(
            uvicorn.Config(
                create_app(scheduler, "tiny", body_timeout_s=0.5), host="127.0.0.1", port=port, log_level="error"
            )
        )
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        while not srv.started:
            time.sleep(0.05)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt"')
                answer = _read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        finally:
            srv.should_exit = True
            thread.join(timeout=10)


def test_one_map_from_errors_to_http_answers():
    """Every endpoint answers an error through api_error: before a request runs, it is at fault (400,
    naming the field the error names); while it runs, a plugin or the model failing is a 500 naming
    the cause; a stopped scheduler is a 503 either way."""
    from nextoken.errors import (
        InvalidRequestError,
        ModelPackageError,
        NextokenError,
        PluginError,
        SchedulerStoppedError,
    )
    from nextoken.serving.server import api_error

    field = api_error(InvalidRequestError("tool_choice needs tools", param="tool_choice"), param="messages")
    assert (field.status, field.param) == (400, "tool_choice")
    assert api_error(ModelPackageError("no chat template"), param="messages").param == "messages"
    for running in (False, True):
        assert api_error(SchedulerStoppedError("closed"), running).status == 503
        assert api_error(InvalidRequestError("bad"), running).status == 400
    assert api_error(PluginError("p failed"), running=False).status == 400  # its options, at resolution
    ran = api_error(PluginError("p failed"), running=True)
    assert (ran.status, ran.code) == (500, "plugin_error")
    assert api_error(NextokenError("NaN logits"), running=True).code == "generation_failed"


def test_idle_streaming_clients_hold_no_thread_each(server, monkeypatch):
    """Each request's events reach its handler through an asyncio queue fed from the scheduler's
    thread: 256 streams waiting on a stalled scheduler add no server threads (a thread a waiting
    request would add 256), and every one of them is answered once it moves on."""
    import asyncio

    IDLE = 256  # the server's default max_pending: as many as it holds

    _, _, scheduler, base = server
    threading_count = threading.active_count
    gate, real = threading.Event(), scheduler.step
    monkeypatch.setattr(scheduler, "step", lambda: gate.wait(60) and real())
    before = threading_count()
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    during, texts = [], []

    async def one(client, opened) -> str:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as r:
            lines = r.aiter_lines()
            first = await lines.__anext__()  # the role chunk: the stream is open and idle
            opened.append(first)
            return first + "".join([line async for line in lines])

    async def clients() -> None:
        opened: list[str] = []
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=IDLE + 16)) as client:
            tasks = [asyncio.ensure_future(one(client, opened)) for _ in range(IDLE)]
            while len(opened) < IDLE:
                await asyncio.sleep(0.05)
            during.append(threading_count())
            gate.set()
            texts.extend(await asyncio.gather(*tasks))

    runner = threading.Thread(target=lambda: asyncio.run(clients()))
    runner.start()
    runner.join(180)
    gate.set()
    assert during and during[0] - before <= 3, (before, during)  # the client's own thread, and no more
    assert len(texts) == IDLE and all(t.rstrip().endswith("data: [DONE]") for t in texts)
