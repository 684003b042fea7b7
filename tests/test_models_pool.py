"""Many models in one process: the ModelPool (loading by the memory plan, least recently used
unloading, pinning, waiting) and the server that routes requests to its models by name, checked
with the openai and anthropic clients against each model served alone."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from helpers import TEMPLATE, running_app, wait_healthy, with_chat_template
from nextoken import Engine, InvalidRequestError
from nextoken.pool import ModelPool, PoolBusyError, UnknownModelError
from nextoken.serving.core import ServeOptions
from nextoken.serving.router import attach_app, close_app, create_router, models_in

KEY = "pool-key"
ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def packages(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three tiny packages of different families, each with a chat template, named by family."""
    root = tmp_path_factory.mktemp("pool")
    return {arch: with_chat_template(tiny_model(arch)[1], root / arch, TEMPLATE) for arch in ARCHS}


@pytest.fixture(scope="module")
def plans(packages) -> dict[str, int]:
    """Each package's planned bytes at batch 2."""
    pool = ModelPool(packages, budget=1 << 40, max_batch=2, engine_options={"device": "cpu", "plugins": False})
    return {d["id"]: d["planned_bytes"] for d in pool.describe()}


def two_of_three(plans: dict[str, int]) -> int:
    """A budget that holds any two of the models, never all three."""
    budget = sum(sorted(plans.values())[1:])
    assert budget < sum(plans.values())
    return budget


def _pool(packages, budget, **kwargs) -> ModelPool:
    return ModelPool(packages, budget=budget, max_batch=2, engine_options={"device": "cpu", "plugins": False}, **kwargs)


def _answer(model, prompt: str = "Hello", n: int = 6) -> list[int]:
    from nextoken import SamplingParams

    handle = model.scheduler.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
    return handle.result().token_ids


def test_the_pool_loads_by_plan_and_unloads_the_least_recently_used(packages, plans):
    budget = two_of_three(plans)
    with _pool(packages, budget) as pool:
        assert [d["state"] for d in pool.describe()] == ["unloaded"] * 3
        seen = []
        for name in ("llama", "qwen2", "llama", "mistral", "qwen2", "llama"):
            with pool.use(name) as model:
                assert model.name == name and _answer(model)
                assert pool.held_bytes <= budget
                seen.append(sorted(d["id"] for d in pool.describe() if d["state"] == "loaded"))
        # mistral displaced qwen2 (llama was used after it), then qwen2 displaced llama, then llama mistral
        assert seen == [
            ["llama"],
            ["llama", "qwen2"],
            ["llama", "qwen2"],
            ["llama", "mistral"],
            ["mistral", "qwen2"],
            ["llama", "qwen2"],
        ]
        loads = {d["id"]: d["loads"] for d in pool.describe()}
        assert loads == {"llama": 2, "qwen2": 2, "mistral": 1}


def test_a_pinned_model_is_loaded_at_start_and_never_unloaded(packages, plans):
    with _pool(packages, two_of_three(plans), pinned=("mistral",)) as pool:
        assert pool.describe("mistral")[0]["state"] == "loaded"
        for name in ("llama", "qwen2", "llama"):
            with pool.use(name):
                pass
        assert pool.describe("mistral")[0]["state"] == "loaded"
        with pytest.raises(InvalidRequestError, match="pinned"):
            pool.unload("mistral")


def test_answers_from_the_pool_equal_each_model_alone(packages, plans):
    with _pool(packages, two_of_three(plans)) as pool:
        for _ in range(2):
            for name, path in packages.items():
                with pool.use(name) as model:
                    got = _answer(model, "Once upon", 8)
                with Engine(path, device="cpu", plugins=False) as alone:
                    want = alone.generate("Once upon", max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
                assert got == want, name


def test_a_model_in_use_is_not_unloaded_and_a_load_waits_for_room(packages, plans):
    with _pool(packages, two_of_three(plans), wait_s=0.3) as pool:
        a, b = pool.acquire("llama"), pool.acquire("qwen2")
        with pytest.raises(PoolBusyError, match=r"mistral .* could not load within 0.3 s.*llama \(loaded, 1 in use\)"):
            pool.acquire("mistral")
        with pytest.raises(InvalidRequestError, match="1 requests in hand"):
            pool.unload("llama")
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire("mistral", wait_s=30)))
        waiter.start()
        time.sleep(0.2)
        assert not got  # still waiting: both models are in use
        pool.release(a)  # llama goes idle: mistral takes its room
        waiter.join(30)
        assert got and got[0].name == "mistral"
        assert pool.describe("llama")[0]["state"] == "unloaded"
        assert _answer(b) and _answer(got[0])  # the model kept in use still serves
        pool.release(b)
        pool.release(got[0])


def test_the_pool_refuses_what_can_never_fit_and_names_models(packages, plans):
    with pytest.raises(InvalidRequestError, match="more than the whole budget"):
        _pool(packages, min(plans.values()) - 1)
    with pytest.raises(InvalidRequestError, match="pinned models plan"):
        _pool(packages, two_of_three(plans), pinned=tuple(packages))
    with pytest.raises(UnknownModelError, match="pinned nope"):
        _pool(packages, 1 << 40, pinned=("nope",))
    with (
        _pool(packages, 1 << 40) as pool,
        pytest.raises(UnknownModelError, match="the models are llama, qwen2, mistral"),
    ):
        pool.acquire("gpt-5")


def test_a_model_that_fails_to_load_leaves_the_pool_serving(packages, plans, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(packages["llama"]).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    with _pool({**packages, "broken": str(broken)}, 1 << 40) as pool:
        with pytest.raises(Exception) as failed:
            pool.acquire("broken")
        assert "model.onnx" in str(failed.value) or "checksum" in str(failed.value).lower()
        described = pool.describe("broken")[0]
        assert described["state"] == "unloaded" and described["error"]
        assert pool.held_bytes == 0
        with pool.use("llama") as model:
            assert _answer(model)


def test_models_in_names_packages_and_refuses_clashes(packages, tmp_path):
    root = tmp_path / "dir"
    root.mkdir()
    (root / "stray").mkdir()
    (root / "alpha").symlink_to(packages["llama"])
    got = models_in([str(packages["qwen2"]), f"custom={packages['mistral']}"], str(root))
    assert got == {"qwen2": str(packages["qwen2"]), "custom": str(packages["mistral"]), "alpha": str(root / "alpha")}
    with pytest.raises(InvalidRequestError, match="two models are named 'qwen2'"):
        models_in([str(packages["qwen2"]), f"qwen2={packages['llama']}"])
    with pytest.raises(InvalidRequestError, match="not a nextoken package"):
        models_in([str(root / "stray")])
    with pytest.raises(InvalidRequestError, match="no such folder"):
        models_in([], str(tmp_path / "missing"))


# -- the server ------------------------------------------------------------------------------------------
def routing(pool: ModelPool, options: ServeOptions):
    return running_app(create_router(pool, options), join_s=20)


@pytest.fixture(scope="module")
def router(packages, plans):
    options = ServeOptions(api_key=KEY)
    pool = ModelPool(
        packages,
        budget=two_of_three(plans),
        max_batch=2,
        engine_options={"device": "cpu", "plugins": False},
        on_load=attach_app(options),
        on_unload=close_app,
        wait_s=60,
    )
    with routing(pool, options) as base:
        yield base, pool, openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def _alone(path: Path, prompt: str, n: int) -> str:
    with Engine(path, device="cpu", plugins=False) as engine:
        return engine.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).text


def test_the_server_routes_each_model_and_answers_as_it_alone_would(router, packages, plans):
    _base, pool, client = router
    want = {name: _alone(path, "Hello there", 8) for name, path in packages.items()}
    for _ in range(2):
        for name in packages:  # round robin: every third request displaces a model
            got = client.completions.create(
                model=name,
                prompt="Hello there",
                max_tokens=8,
                temperature=0,
                extra_body={"nextoken": {"ignore_eos": True}},
            )
            assert got.model == name and got.choices[0].text == want[name]
            assert pool.held_bytes <= pool.budget
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert set(listed) == set(packages)
    assert sorted(m["state"] for m in listed.values()) == ["loaded", "loaded", "unloaded"]
    assert all(m["planned_bytes"] == plans[name] for name, m in listed.items())
    # streaming through the router
    text = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="qwen2",
            prompt="Hello there",
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"nextoken": {"ignore_eos": True}},
        )
        if chunk.choices
    )
    assert text == want["qwen2"]
    chat = client.chat.completions.create(model="mistral", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "mistral" and chat.usage.completion_tokens >= 1


def test_the_server_names_the_models_it_has(router):
    base, _pool, client = router
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=2)
    assert "the models are llama, qwen2, mistral" in str(missing.value)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    assert client.models.retrieve("llama").id == "llama"
    nameless = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert nameless.status_code == 400 and "model is required" in nameless.json()["error"]["message"]
    messages = anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        messages.messages.create(model="claude", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert unknown.value.body["error"]["type"] == "not_found_error"
    answer = messages.messages.create(model="llama", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert answer.model == "llama" and answer.usage.output_tokens >= 1


def test_load_and_unload_endpoints(router):
    base, pool, _client = router
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{base}/models/load", json={"model": "mistral"}).status_code == 401
    loaded = httpx.post(f"{base}/models/load", json={"model": "mistral"}, headers=auth, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
    gone = httpx.post(f"{base}/models/unload", json={"model": "mistral"}, headers=auth)
    assert gone.status_code == 200 and gone.json()["state"] == "unloaded"
    assert httpx.post(f"{base}/models/load", json={"model": "nope"}, headers=auth).status_code == 404
    model = pool.acquire("llama")
    try:
        busy = httpx.post(f"{base}/models/unload", json={"model": "llama"}, headers=auth)
        assert busy.status_code == 409 and "requests in hand" in busy.json()["error"]["message"]
    finally:
        pool.release(model)
    health = httpx.get(f"{base}/health").json()
    assert health["status"] == "ok" and health["held_bytes"] <= health["budget_bytes"]


def test_an_unloaded_model_leaves_nothing_behind(router):
    """After completions, a stream, chat, messages and a stored response through the router, the
    unloaded model's engine and scheduler are collected (nothing the server keeps refers to them)."""
    import gc
    import weakref

    base, pool, client = router
    auth = {"Authorization": f"Bearer {KEY}"}
    client.completions.create(model="qwen2", prompt="Hi", max_tokens=2)
    list(client.completions.create(model="qwen2", prompt="Hi", max_tokens=2, stream=True))
    client.chat.completions.create(model="qwen2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    client.responses.create(model="qwen2", input="Hi", max_output_tokens=2)
    messages = anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0)
    messages.messages.create(model="qwen2", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    model = pool.loaded("qwen2")
    assert model is not None
    engine, scheduler = weakref.ref(model.engine), weakref.ref(model.scheduler)
    del model
    assert httpx.post(f"{base}/models/unload", json={"model": "qwen2"}, headers=auth).status_code == 200
    gc.collect()
    assert engine() is None and scheduler() is None


def test_metrics_carry_the_model(router):
    base, _pool, client = router
    client.completions.create(model="llama", prompt="Hi", max_tokens=2)
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'nextoken_generation_tokens_total{model="llama"}' in text


def test_responses_are_stored_per_model_and_found_by_id(router):
    _base, _pool, client = router
    made = client.responses.create(model="llama", input="Hi", max_output_tokens=3)
    assert client.responses.retrieve(made.id).id == made.id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")


def test_concurrent_requests_for_every_model_stay_within_budget(router, packages):
    base, pool, _client = router
    want = {name: _alone(path, "Tell me", 6) for name, path in packages.items()}
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], pool.held_bytes)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    got: dict[int, tuple[str, str]] = {}

    def ask(i: int, name: str):
        body = {"model": name, "prompt": "Tell me", "max_tokens": 6, "temperature": 0, "nextoken": {"ignore_eos": True}}
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        got[i] = (name, r.json()["choices"][0]["text"] if r.status_code == 200 else f"{r.status_code} {r.text}")

    names = list(packages) * 4
    threads = [threading.Thread(target=ask, args=(i, name)) for i, name in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join()
    assert len(got) == len(names)
    assert all(text == want[name] for name, text in got.values()), got
    assert peak[0] <= pool.budget
    # each model goes back to the pool just after its answer's last byte: in_use returns to zero
    deadline = time.monotonic() + 10
    while any(d["in_use"] for d in pool.describe()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(d["in_use"] == 0 for d in pool.describe()), json.dumps(pool.describe())


def test_the_cli_serves_a_models_dir_within_a_budget(packages, plans, tmp_path):
    import subprocess
    import sys

    from helpers import run_cli

    root = tmp_path / "models"
    root.mkdir()
    for name, path in packages.items():
        (root / name).symlink_to(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    budget_mb = -(-two_of_three(plans) // 2**20)
    command = [sys.executable, "-m", "nextoken", "serve", "--models-dir", str(root), "--port", str(port)]
    command += ["--device", "cpu", "--memory-budget-mb", str(budget_mb), "--pin", "llama", "--max-batch", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        listed = {m["id"]: m for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert listed["llama"]["state"] == "loaded" and listed["llama"]["pinned"]
        assert listed["qwen2"]["state"] == "unloaded"
        for name in ("qwen2", "mistral", "qwen2"):
            body = {"model": name, "prompt": "Hi", "max_tokens": 3}
            assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200
        states = {m["id"]: m["state"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert states == {"llama": "loaded", "qwen2": "loaded", "mistral": "unloaded"}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"serving 3 models at {base}/v1 within {budget_mb} MiB" in out, out + err
    # flags that belong to one model, and ones that belong to several
    wrong = run_cli("serve", str(packages["llama"]), str(packages["qwen2"]), "--draft", f"d={packages['llama']}")
    assert wrong.returncode == 2 and "--draft is for one model" in wrong.stderr
    alone = run_cli("serve", str(packages["llama"]), "--pin", "llama")
    assert alone.returncode == 2 and "--pin is for several models" in alone.stderr
    none = run_cli("serve")
    assert none.returncode == 2 and "serve needs a package" in none.stderr
