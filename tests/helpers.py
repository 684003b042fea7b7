"""Helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260k"
ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gemma")
#: A plain chat template for the tiny test models (role tags, each turn ended by EOS).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m nextoken ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "nextoken", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def with_chat_template(package: Path, target: Path, template: str) -> Path:
    """A copy of ``package`` at ``target`` whose tokenizer_config.json carries ``template``."""
    import json
    import shutil

    shutil.copytree(package, target)
    cfg = json.loads((target / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(cfg))
    return rehash(target)


def rehash(package: Path) -> Path:
    """Record the package's files as they are now in its manifest (after a test edited one on
    purpose), as a re-export would: loading refuses files that differ from their checksums."""
    from nextoken.manifest import Manifest

    Manifest.load(package).with_files(package).save(package)
    return package


STEPS = ("prefill", "decode", "prefill_in_place", "decode_in_place")


def wrap_steps(monkeypatch, runner, around) -> None:
    """Route every model step of ``runner`` through ``around(kind, real, *args)`` (kind: one of
    :data:`STEPS`; ``real`` takes the same arguments), to watch steps or inject faults into them
    whatever the KV backend."""
    for kind in STEPS:
        real = getattr(runner, kind)

        def step(*args, _kind=kind, _real=real, **kwargs):
            return around(_kind, lambda *a: _real(*a, **kwargs), *args)

        monkeypatch.setattr(runner, kind, step)


def with_manifest(package: Path, target: Path, **changes) -> Path:
    """A copy of ``package`` at ``target`` whose manifest has ``changes`` (its checksums unchanged:
    :func:`rehash` it where loading must get past them)."""
    import json
    import shutil

    shutil.copytree(package, target)
    data = json.loads((target / "nextoken.json").read_text())
    data.update(changes)
    (target / "nextoken.json").write_text(json.dumps(data))
    return target


@contextlib.contextmanager
def serving(package: Path, model: str, max_batch: int = 4, engine_options: dict | None = None, **app_options):
    """``nextoken.serving`` over ``package`` on a free loopback port, in this process:
    (an openai client, the engine, the scheduler, the base URL)."""
    import openai

    from nextoken import Engine, Scheduler
    from nextoken.serving.server import create_app

    engine = Engine(package, device="cpu", plugins=False, **(engine_options or {}))
    scheduler = Scheduler(engine, max_batch=max_batch).start()
    key = app_options.get("api_key") or "none"
    try:
        with running_app(create_app(scheduler, model, **app_options)) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
            yield client, engine, scheduler, base
    finally:
        scheduler.close()
        engine.close()


@contextlib.contextmanager
def running_app(app, join_s: float = 10):
    """``app`` served by uvicorn on a free loopback port in a thread of this process: its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=join_s)


def wait_healthy(base: str, tries: int = 300) -> None:
    """Wait for a server started in another process to answer ``/health`` (0.1 s between tries)."""
    import time

    import httpx

    for _ in range(tries):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)


#: What the forced "thinking model" says: its thinking, then its answer.
THOUGHT, ANSWER = "The cat.", "A dog."


def forcing(ids: list[int], eos: int):
    """A plugin whose logits processor ``force`` makes the model say ``ids``, then ``eos``."""
    import nextoken

    class Force:
        @nextoken.hookimpl
        def register_logits_processors(self, register):
            def factory(params, options):
                def force(logits, state):
                    step = len(state.generated[0])
                    logits[:] = -1e9
                    logits[:, ids[step] if step < len(ids) else eos] = 0.0
                    return logits

                return force

            register("force", factory)

    return Force()


def thinking_server(stories_package: Path, target: Path):
    """A server of the stories model made to say ``<think>THOUGHT</think>ANSWER`` (a logits processor
    named ``force``, which requests ask for: ``{"nextoken": {"processors": ["force"]}}``), under a
    template that closes a think tag, so the ``think`` parser is chosen by ``auto``."""
    from nextoken import Engine

    text = f"<think>{THOUGHT}</think>{ANSWER}"
    with Engine(stories_package) as probe:
        ids = probe.encode(text)[1:] if probe.tokenizer.adds_bos else probe.encode(text)
        assert probe.decode(ids) == text, probe.decode(ids)
        eos = probe.eos_token_ids[0]

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}</think>"
    pkg = with_chat_template(stories_package, target, template)
    return serving(pkg, "thinker", engine_options={"extra_plugins": [forcing(ids, eos)]})
