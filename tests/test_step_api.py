"""One loop: the public step API, the KV backends behind one protocol, per-hook timings, the test
double for plugin authors, registration through pluggy, and the layout's rules (no module reads
another's private names; no import cycles; the runtime never imports exporters or tooling)."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pluggy
import pytest

import nextoken
from helpers import REPO, run_cli
from nextoken import Engine, InvalidRequestError, PluginError, Scheduler
from nextoken.kvbackends import for_request
from nextoken.testing import CharTokenizer, FakeEngine, ScriptedModel

PROMPT = "A much longer prompt than the first"


# -- the step API ------------------------------------------------------------------------------------


def _drive(engine: Engine, prompts, **kw):
    """A request driven by hand through the public step API, as any driver would."""
    gen = engine.start(prompts, **kw)
    gen.begin()
    longest = max(len(p) for p in gen.state.prompts)
    kv = for_request(engine.runner, gen.state.batch_size, longest + gen.params.max_new_tokens, engine.pad_token_id)
    pre = kv.prefill(gen.state.prompts)
    kv.join(pre)
    gen.prefilled(pre.seconds)
    logits, events = pre.logits, []
    while True:
        tokens, step_events = gen.advance(logits)
        events += step_events
        if gen.finished:
            break
        logits = kv.decode(tokens, gen.state.alive)
    return gen.end(pre.seconds, kv.nbytes()), events


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_k=20, seed=7, stop=["e"])])
def test_a_request_driven_through_the_step_api_equals_generate(llama_engine, kw):
    prompts = [PROMPT, "Hello there"]
    by_hand, events = _drive(llama_engine, prompts, max_new_tokens=12, **kw)
    alone = llama_engine.generate(prompts, max_new_tokens=12, **kw)
    assert [c.token_ids for c in by_hand] == [c.token_ids for c in alone]
    assert [c.text for c in by_hand] == [c.text for c in alone]
    assert "".join(e.text for e in events if e.index == 0) == alone[0].text


def test_a_request_is_passive_until_driven_and_runs_once(llama_engine):
    gen = llama_engine.start(PROMPT, max_new_tokens=2)
    assert not gen.started
    with pytest.raises(InvalidRequestError, match="has not run: run it with Engine.run"):
        gen.completions()
    with pytest.raises(TypeError):
        iter(gen)  # no driver inside: iterating it is not running it
    assert len(llama_engine.complete(gen)) == 1 and gen.started
    for again in (
        lambda: llama_engine.complete(gen),
        lambda: Scheduler(llama_engine).submit(gen),
        gen.begin,
    ):
        with pytest.raises(InvalidRequestError, match="already run"):
            again()
    with Scheduler(llama_engine) as scheduler:  # what the engine built, submitted as it is
        built = llama_engine.start(PROMPT, max_new_tokens=3, ignore_eos=True)
        assert (
            scheduler.submit(built).result(timeout=60).token_ids
            == llama_engine.generate(PROMPT, max_new_tokens=3, ignore_eos=True).token_ids
        )
        with pytest.raises(InvalidRequestError, match="give them to start\\(\\), not submit\\(\\)"):
            scheduler.submit(llama_engine.start(PROMPT), max_new_tokens=3)


def test_cancel_ends_every_live_sequence_with_its_reason(llama_engine):
    gen = llama_engine.start([PROMPT, "Hi"], max_new_tokens=20)
    events = gen.cancel()
    assert gen.finished and [e.finish_reason for e in events] == ["cancelled", "cancelled"]


def test_the_scheduler_and_generate_run_one_backend_protocol(llama_engine, optimum_engine):
    assert Scheduler(llama_engine).kv.name == "slots" and Scheduler(optimum_engine).kv.name == "concat"
    assert type(for_request(llama_engine.runner, 1, 32, 0)).__name__ == "SlotBackend"
    assert type(for_request(optimum_engine.runner, 1, 32, 0)).__name__ == "ConcatBackend"


def test_cached_forward_decodes_through_the_generation_backend(llama_engine):
    ids = llama_engine.encode(PROMPT)
    full, step = llama_engine.forward(ids), llama_engine.forward(ids, cached=True)
    assert step.shape == (1, llama_engine.manifest.vocab_size)
    np.testing.assert_allclose(step[0], full[-1], atol=1e-4)
    with pytest.raises(InvalidRequestError, match="at least two token ids"):
        llama_engine.forward(ids[:1], cached=True)


# -- per-hook timings ----------------------------------------------------------------------------------

CHAIN = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=0, stop=["zzz"])


def test_hook_timings_name_every_plugin_the_request_used(llama_engine):
    got = llama_engine.generate(PROMPT, max_new_tokens=8, hook_timings=True, **CHAIN)
    hooks = got.usage.hook_ms
    for key in (
        "logits_processor:temperature",
        "logits_processor:top_k",
        "logits_processor:top_p",
        "logits_processor:repetition_penalty",
        "strategy:sample",
        "stop_condition:stop_strings",
        "stop_condition:max_new_tokens",
        "tokenizer:decode",
    ):
        assert key in hooks, (key, sorted(hooks))
    assert all(v >= 0 for v in hooks.values()) and sum(hooks.values()) < got.usage.wall_ms
    # the same tokens as without timings: timing watches, it changes nothing
    assert got.token_ids == llama_engine.generate(PROMPT, max_new_tokens=8, **CHAIN).token_ids


def test_without_hook_timings_nothing_is_wrapped(llama_engine):
    gen = llama_engine.start(PROMPT, max_new_tokens=4, **CHAIN)
    assert gen.pipeline.seconds is None
    pieces = gen.pipeline.processors + [gen.pipeline.strategy]
    assert all("_timed" not in getattr(p.fn, "__qualname__", "") for p in pieces)
    assert llama_engine.complete(gen)[0].usage.hook_ms is None
    with pytest.raises(InvalidRequestError, match="hook_timings must be true or false"):
        nextoken.SamplingParams(hook_timings="yes")


def test_bench_chain_prints_the_per_hook_table(tiny_llama):
    out = run_cli(
        "bench", str(tiny_llama[1]), "--chain", "--batch", "1,2", "--prompt-tokens", "8", "--new", "8", "--repeat", "1"
    )
    assert out.returncode == 0, out.stderr
    assert "per hook, ms per decode step" in out.stdout
    for key in ("logits_processor:top_k", "strategy:sample", "tokenizer:decode", "all plugins"):
        assert key in out.stdout, out.stdout


# -- the test double -----------------------------------------------------------------------------------


def test_a_scripted_model_runs_the_real_loop():
    model = ScriptedModel([5, 6, 7, 2], vocab_size=16)
    with FakeEngine(model, eos_token_ids=(2,)) as engine:
        got = engine.generate([1, 3], max_new_tokens=8)
        assert got.token_ids == [5, 6, 7, 2] and got.finish_reason == "stop"
        assert model.prefills == 1 and model.decode_steps == 3 and model.seen == [[1, 3, 5, 6, 7]]
        batch = engine.generate([[1, 3], [4]], max_new_tokens=3, temperature=0.5, seed=4)
        assert batch[1].token_ids == engine.generate([4], max_new_tokens=3, temperature=0.5, seed=4).token_ids


def test_a_plugin_tested_on_the_scripted_model():
    """What a plugin author writes: a processor that bans a token, checked in milliseconds."""

    def make_ban(params, options):
        banned = options.get("token", 6)

        def ban(logits, state):
            logits = logits.copy()
            logits[:, banned] = -np.inf
            return logits

        return ban

    plugin = type(
        "Ban", (), {"register_logits_processors": nextoken.hookimpl(lambda self, register: register("ban", make_ban))}
    )()
    tokenizer = CharTokenizer()
    model = ScriptedModel(
        lambda prompt, generated: tokenizer.encode("abab")[len(generated) % 4], vocab_size=len(tokenizer.alphabet)
    )
    with FakeEngine(model, tokenizer=tokenizer, extra_plugins=[plugin]) as engine:
        free = engine.generate("hi", max_new_tokens=4)
        banned = engine.generate(
            "hi", max_new_tokens=4, processors=["ban"], options={"ban": {"token": tokenizer.encode("b")[0]}}
        )
        assert free.text == "abab" and "b" not in banned.text and banned.text.startswith("a")
        stopped = engine.generate("hi", max_new_tokens=10, stop=["ba"])
        assert stopped.text == "a" and stopped.finish_reason == "stop"


# -- registration through pluggy -------------------------------------------------------------------------


def test_registration_hooks_run_through_pluggy_wrappers_and_monitoring(tiny_llama):
    seen = []

    class Wrapper:
        @nextoken.hookimpl(wrapper=True)
        def register_strategies(self, register):
            seen.append("wrapper before")
            result = yield
            seen.append("wrapper after")
            return result

    with Engine(tiny_llama[1], plugins=False) as engine:
        calls = []
        undo = engine.plugins.pm.add_hookcall_monitoring(
            lambda name, impls, kwargs: calls.append(name), lambda outcome, name, impls, kwargs: None
        )
        engine.register(Wrapper())  # what is provided is collected again, through pluggy
        assert engine.generate(PROMPT, max_new_tokens=2).token_ids
        undo()
        assert seen == ["wrapper before", "wrapper after"]
        assert {"register_strategies", "register_logits_processors"} <= set(calls)
        rows = {r["plugin"]: r for r in engine.plugins.listing()}
        assert rows["nextoken.plugins.sampling"]["provides"]["strategy"] == ["greedy", "sample"]


def test_a_registration_that_raises_is_blamed_on_its_plugin(tiny_llama):
    def explode(register):
        raise KeyError("oops")

    with Engine(tiny_llama[1], plugins=False) as engine:
        engine.register(
            type("P", (), {"register_strategies": nextoken.hookimpl(lambda self, register: explode(register))})(),
            "exploding",
        )
        with pytest.raises(PluginError, match="plugin 'exploding' failed in register_strategies: KeyError"):
            engine.generate(PROMPT, max_new_tokens=2)


# -- the layout's rules ----------------------------------------------------------------------------------

ROOTS = {"sdk": "nextoken", "plugins": "nextoken.plugins", "exporters": "nextoken.exporters"}
#: The runtime: what a deployed engine imports. Tooling (bench, peers, the planner, cost projection),
#: serving, the CLI and the exporters sit above it.
RUNTIME = {
    "nextoken." + m
    for m in (
        "adapters",
        "chat",
        "device",
        "dtypes",
        "embedding",
        "engine",
        "errors",
        "generation",
        "hookspecs",
        "intake",
        "kvbackends",
        "kvcache",
        "manifest",
        "metrics",
        "ortbind",
        "prefixcache",
        "probes",
        "reasoning",
        "records",
        "registry",
        "runner",
        "scheduler",
        "speculation",
        "threads",
        "tokenizer",
        "toolcalls",
        "types",
    )
}
#: Private names read on purpose, with why: onnxruntime's own, kept in the one module made for them.
ALLOWED_PRIVATE = {("ortbind.py", "_iobinding"), ("ortbind.py", "_ortvalue"), ("ortbind.py", "_get_c_device")}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            mods[".".join((package,) + parts)] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict[str, pathlib.Path]) -> set[str]:
    """nextoken modules ``name`` imports anywhere (lazy imports too), leaving out TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in mods else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in mods and m != name}


def test_the_import_graph_has_no_cycles_and_the_runtime_imports_nothing_above_it():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    for module in sorted(RUNTIME):
        above = graph[module] - RUNTIME
        assert not above, f"{module} (runtime) imports {sorted(above)}"


def test_the_request_path_flows_down_at_run_time(tiny_llama, monkeypatch):
    """engine -> scheduler -> generation -> backends -> runner: once requests are built and their
    schedulers made, running them calls nothing of the engine (every Engine method is a tripwire),
    alone, in a shared batch with a prompt built by the scheduler's intake, in chunks, and through
    the prefix cache."""
    from nextoken import Engine

    called: list[str] = []
    with Engine(tiny_llama[1], device="cpu", prefix_cache_bytes=1 << 20) as engine:
        kw = dict(max_new_tokens=5, ignore_eos=True)
        want = {p: engine.generate(p, **kw).token_ids for p in (PROMPT, "Hi", "Hi there")}
        alone = engine.start(PROMPT, **kw)
        by_itself = Scheduler.alone(engine, alone)
        shared = Scheduler(engine, max_batch=3, max_prefill_tokens=4)  # PROMPT comes in chunks
        built = [engine.start(p, **kw) for p in (PROMPT, "Hi")]
        for name, value in vars(Engine).items():
            if callable(value) and not name.startswith("__"):
                monkeypatch.setattr(Engine, name, lambda *a, _n=name, **k: called.append(_n))
        assert [e.token_id for e in by_itself.run(alone)] == want[PROMPT]
        handles = [shared.submit(g) for g in built] + [shared.submit("Hi there", **kw)]
        while shared.step():
            pass
        monkeypatch.undo()
        assert [h.result().token_ids for h in handles] == [want[PROMPT], want["Hi"], want["Hi there"]]
        assert engine.prefix_cache is not None and engine.prefix_cache.stats.hits >= 1
    assert called == []
    # and in the code: the scheduler keeps the engine for its owner, and never reads it back
    tree = ast.parse((REPO / "sdk" / "scheduler.py").read_text())
    reads = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr == "engine" and isinstance(n.ctx, ast.Load)
    ]
    assert reads == [], f"scheduler.py reads self.engine at lines {reads}"


def test_no_module_reads_another_modules_private_names():
    problems = []
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        own |= {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                mine = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if not mine and node.attr not in own and (path.name, node.attr) not in ALLOWED_PRIVATE:
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} reads {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("nextoken", "")) and node.level:
                problems += [
                    f"{path.relative_to(REPO)}:{node.lineno} imports {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not problems, "\n".join(problems)


def test_builtin_plugins_import_only_the_public_api():
    for path in sorted((REPO / "plugins").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nextoken"):
                assert node.module == "nextoken", f"{path.name} imports from {node.module}: use the nextoken API"
            if isinstance(node, ast.Import):
                assert all(a.name == "nextoken" or not a.name.startswith("nextoken") for a in node.names), path.name


def test_pluggy_is_what_the_registry_calls():
    assert isinstance(nextoken.Registry(False).pm, pluggy.PluginManager)


def test_memory_figures_are_the_process_s_and_sampled_outside_the_loop(llama_engine, monkeypatch):
    """Requests never reset the process's peak (under the scheduler an admission would reset every
    running request's figure), and the scheduler reads /proc at most once a second, not once a request."""
    from nextoken import probes

    reads = []
    real = probes.peak_rss_bytes
    monkeypatch.setattr(probes, "reset_peak_rss", lambda: pytest.fail("a request reset the process's peak"))
    monkeypatch.setattr(probes, "peak_rss_bytes", lambda: reads.append(1) or real())
    alone = llama_engine.generate(PROMPT, max_new_tokens=4)
    assert alone.usage.peak_memory_bytes and len(reads) == 1
    reads.clear()
    scheduler = Scheduler(llama_engine, max_batch=4)
    handles = [scheduler.submit(PROMPT, max_new_tokens=3 + i) for i in range(8)]
    while scheduler.step():
        pass
    assert all(h.result().usage.peak_memory_bytes for h in handles) and len(reads) <= 2


def test_request_fields_are_defined_once_and_the_cli_and_server_follow(tiny_llama):
    """SamplingParams' field metadata makes the CLI flags and the server's nextoken object."""
    import dataclasses

    from nextoken.serving.api_schema import NEXTOKEN_FIELDS, NextokenOptions

    fields = dataclasses.fields(nextoken.SamplingParams)
    out = run_cli("generate", "--help")
    for f in fields:
        assert f.metadata["doc"] and f.metadata["doc"][:30].split()[0] in (nextoken.SamplingParams.__doc__ or "")
        if f.metadata["flag"] is not None:
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            assert flag in out.stdout, flag
    assert set(NEXTOKEN_FIELDS) == {f.name for f in fields if f.metadata["api"] == "nextoken"}
    assert set(NEXTOKEN_FIELDS) <= set(NextokenOptions.model_fields)
    assert {"stop_token_ids", "hook_timings"} <= set(NEXTOKEN_FIELDS)
    got = run_cli(
        "generate",
        str(tiny_llama[1]),
        "Hello",
        "--max-new-tokens",
        "3",
        "--hook-timings",
        "--json",
        "--stop-token-id",
        "99999",
        "--temperature",
        "0.5",
        "--seed",
        "1",
    )
    assert got.returncode == 0, got.stderr
    import json

    usage = json.loads(got.stdout)["usage"]
    assert usage["completion_tokens"] == 3 and "strategy:sample" in usage["hook_ms"]


def test_one_dtype_table_refuses_a_cache_the_runtime_cannot_hold_at_load(tiny_llama, tmp_path):
    from helpers import rehash, with_manifest
    from nextoken import ModelPackageError
    from nextoken.dtypes import DTYPES

    pkg = with_manifest(tiny_llama[1], tmp_path / "bf16", kv_dtype="bfloat16")
    manifest = nextoken.Manifest.load(pkg).to_dict()
    with pytest.raises(ModelPackageError, match="keeps its KV cache in bfloat16, which nextoken cannot hold yet"):
        Engine(rehash(pkg))
    # and it counts 2 bytes an element, as every other reader of the one table does
    keys_and_values = 2 * manifest["num_layers"] * manifest["num_kv_heads"] * manifest["head_dim"]
    assert (
        nextoken.Manifest.load(pkg).kv_bytes_per_token()
        == keys_and_values * DTYPES["bfloat16"].itemsize
        == keys_and_values * 2
    )


def test_generate_is_the_scheduler_run_to_completion_on_the_callers_thread(llama_engine, monkeypatch):
    """One driver: Engine.generate/stream run a Scheduler made for the request (a batch of prompts
    is one request of several sequences), stepping it on the caller's thread."""
    import threading

    steps = []
    real = Scheduler.step
    monkeypatch.setattr(Scheduler, "step", lambda self: steps.append(threading.current_thread()) or real(self))
    got = llama_engine.generate([PROMPT, "Hi"], max_new_tokens=5, ignore_eos=True)
    assert len(steps) == 5 and set(steps) == {threading.current_thread()}  # a prefill step, then 4 decode steps
    events = list(llama_engine.stream(PROMPT, max_new_tokens=3, ignore_eos=True))
    assert [e.index for e in events] == [0, 0, 0] and len(steps) == 8
    scheduler = Scheduler.alone(llama_engine, llama_engine.start([PROMPT, "Hi"], max_new_tokens=5))
    assert (
        scheduler.max_batch == 2
        and scheduler.kv.name == "slots"
        and scheduler.slot_length == len(llama_engine.encode(PROMPT)) + 5
    )
    assert [c.token_ids for c in got] == [
        c.token_ids for c in [llama_engine.generate(p, max_new_tokens=5, ignore_eos=True) for p in (PROMPT, "Hi")]
    ]


def test_run_refuses_a_scheduler_that_runs_on_its_own_thread(llama_engine):
    with Scheduler(llama_engine) as scheduler:
        with pytest.raises(InvalidRequestError, match="submit\\(\\) to it instead of run\\(\\)"):
            next(scheduler.run(llama_engine.start(PROMPT, max_new_tokens=2)))
        assert scheduler.submit(PROMPT, max_new_tokens=2).result(timeout=60).token_ids


# -- n > 1: choices from one prefill ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama_engine", "optimum_engine"])
def test_n_choices_share_one_prefill_and_equal_seed_plus_index_alone(which, request, monkeypatch):
    """Both KV backends: the prompt is prefilled once and its cache copied to the n sequences;
    choice i is the same request alone with seed + i (greedy: n identical answers)."""
    from helpers import wrap_steps

    engine = request.getfixturevalue(which)
    alone = [
        engine.generate(PROMPT, max_new_tokens=10, temperature=0.9, seed=11 + i, ignore_eos=True) for i in range(3)
    ]
    steps = []
    wrap_steps(monkeypatch, engine.runner, lambda kind, real, *a: steps.append(kind) or real(*a))
    got = engine.generate(PROMPT, max_new_tokens=10, temperature=0.9, seed=11, ignore_eos=True, n=3)
    assert [k for k in steps if k.startswith("prefill")] == ["prefill"]  # one prefill for three choices
    assert [c.token_ids for c in got] == [a.token_ids for a in alone]
    assert all(c.usage.prompt_tokens == len(engine.encode(PROMPT)) for c in got)
    monkeypatch.undo()
    two = engine.generate([PROMPT, "Hi"], max_new_tokens=6, temperature=0.7, seed=2, n=2, ignore_eos=True)
    assert [c.token_ids for c in two] == [
        engine.generate(p, max_new_tokens=6, temperature=0.7, seed=2 + i, ignore_eos=True).token_ids
        for p in (PROMPT, "Hi")
        for i in range(2)
    ]
    greedy = engine.generate(PROMPT, max_new_tokens=6, n=2)
    assert greedy[0].token_ids == greedy[1].token_ids


def test_n_choices_under_the_scheduler_and_its_limits(llama_engine):
    scheduler = Scheduler(llama_engine, max_batch=4)
    handle = scheduler.submit(PROMPT, max_new_tokens=8, temperature=0.8, seed=4, n=3, ignore_eos=True)
    other = scheduler.submit("Hi", max_new_tokens=5, temperature=0.8, seed=1, ignore_eos=True)
    while scheduler.step():
        pass
    assert [c.token_ids for c in handle.results()] == [
        llama_engine.generate(PROMPT, max_new_tokens=8, temperature=0.8, seed=4 + i, ignore_eos=True).token_ids
        for i in range(3)
    ]
    assert (
        other.result().token_ids
        == llama_engine.generate("Hi", max_new_tokens=5, temperature=0.8, seed=1, ignore_eos=True).token_ids
    )
    with pytest.raises(InvalidRequestError, match=r"n=5 choices need 5 sequences at once, more than this scheduler's"):
        scheduler.submit(PROMPT, n=5)
    for bad in (0, 65, 1.5):
        with pytest.raises(InvalidRequestError, match="n must be"):
            llama_engine.generate(PROMPT, n=bad)


def test_n_choices_on_the_scripted_model():
    model = ScriptedModel(lambda prompt, generated: 3 + len(generated), vocab_size=16)
    with FakeEngine(model) as engine:
        got = engine.generate([1, 2], max_new_tokens=3, n=2)
        assert [c.token_ids for c in got] == [[3, 4, 5], [3, 4, 5]] and model.prefills == 1


def test_cli_n_prints_each_choice(tiny_llama):
    import json

    got = run_cli(
        "generate",
        str(tiny_llama[1]),
        "Hello",
        "--max-new-tokens",
        "4",
        "--n",
        "3",
        "--temperature",
        "0.9",
        "--seed",
        "2",
        "--ignore-eos",
        "--json",
    )
    assert got.returncode == 0, got.stderr
    choices = json.loads(got.stdout)
    assert len(choices) == 3 and all(len(c["token_ids"]) == 4 for c in choices)
    shown = run_cli(
        "generate", str(tiny_llama[1]), "Hello", "--max-new-tokens", "4", "--n", "2", "--temperature", "0.9"
    )
    assert shown.returncode == 0 and shown.stdout.count("[choice ") == 2
