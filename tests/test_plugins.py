"""The plugin system: registration, discovery, the lifecycle, errors that name the plugin."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import types

import numpy as np
import pytest

import nextoken
from helpers import REPO, run_cli, with_manifest
from nextoken import Engine, PluginError
from nextoken.testing import CharTokenizer, FakeEngine, ScriptedModel
from nextoken.tools.cost import project

EXAMPLE = REPO / "examples" / "nextoken-example-plugin"


def _plugin(**hooks) -> types.SimpleNamespace:
    """A plugin object made of hook implementations."""
    return types.SimpleNamespace(**{name: nextoken.hookimpl(fn) for name, fn in hooks.items()})


@pytest.fixture()
def engine(tiny_llama):
    with Engine(tiny_llama[1], device="cpu", plugins=False) as e:
        yield e


@pytest.fixture()
def fake():
    """An engine over a scripted model (nextoken.testing): for plugin tests where weights add nothing."""
    tokenizer = CharTokenizer()
    model = ScriptedModel(lambda prompt, generated: 3 + len(generated) % 20, vocab_size=len(tokenizer.alphabet))
    with FakeEngine(model, tokenizer=tokenizer) as e:
        yield e


def test_builtins_are_registered_through_the_hooks(engine):
    rows = {r["plugin"]: r for r in engine.plugins.listing()}
    assert rows["nextoken.plugins.sampling"]["provides"]["strategy"] == ["greedy", "sample"]
    assert set(rows["nextoken.plugins.stopping"]["provides"]["stop_condition"]) == {
        "eos",
        "stop_token_ids",
        "stop_strings",
        "max_new_tokens",
        "deadline",
    }
    assert rows["nextoken.plugins.costs"]["provides"]["cost_meter"] == ["per_token", "device_hour"]
    assert rows["nextoken.plugins.hf_tokenizer"]["provides"]["tokenizer"] == ["hf"]
    assert all(r["distribution"] == "nextoken (built-in)" for r in rows.values())


def test_a_runtime_plugin_on_one_engine_only(engine, tiny_llama):
    def make_ban(params, options):
        banned = list(options.get("ids", []))

        def ban(logits, state):
            logits[:, banned] = -np.inf
            return logits

        return ban

    free = engine.generate("abc", max_new_tokens=12, ignore_eos=True).token_ids
    name = engine.register(_plugin(register_logits_processors=lambda register: register("ban", make_ban)), "ban-plugin")
    assert name == "ban-plugin"
    got = engine.generate(
        "abc", max_new_tokens=12, ignore_eos=True, processors=("ban",), options={"ban": {"ids": free[:3]}}
    )
    assert not set(free[:3]) & set(got.token_ids)
    with Engine(tiny_llama[1], device="cpu", plugins=False) as other:
        with pytest.raises(nextoken.InvalidRequestError, match="unknown logits processor 'ban'"):
            other.generate("abc", processors=("ban",))
    engine.unregister("ban-plugin")
    with pytest.raises(nextoken.InvalidRequestError, match="unknown logits processor 'ban'"):
        engine.generate("abc", processors=("ban",))


def test_a_custom_strategy_by_name(engine):
    def make_second(params, options):
        return lambda logits, state: np.argsort(logits, axis=1)[:, -2]

    engine.register(_plugin(register_strategies=lambda register: register("second_best", make_second)))
    ids = engine.encode("hello")
    got = engine.generate(ids, max_new_tokens=1, strategy="second_best")
    assert got.token_ids[0] == int(np.argsort(engine.forward(ids)[-1])[-2])


def test_a_processor_that_raises_names_the_plugin_and_the_engine_goes_on(fake):
    def make_broken(params, options):
        def broken(logits, state):
            if state.step == 3:
                raise RuntimeError("boom at step 3")
            return logits

        return broken

    fake.register(_plugin(register_logits_processors=lambda register: register("broken", make_broken)), "bad-plugin")
    with pytest.raises(
        PluginError,
        match=r"plugin 'bad-plugin' failed in logits_processor 'broken' "
        r"\(register_logits_processors\): RuntimeError: boom at step 3",
    ):
        fake.generate("abc", max_new_tokens=10, ignore_eos=True, processors=("broken",))
    assert len(fake.generate("abc", max_new_tokens=5, ignore_eos=True).token_ids) == 5


def test_a_factory_and_a_registration_that_raise(fake):
    def make_bad(params, options):
        raise ValueError("bad options")

    fake.register(_plugin(register_stop_conditions=lambda register: register("bad", make_bad)), "bad-factory")
    with pytest.raises(PluginError, match="plugin 'bad-factory' failed in stop_condition 'bad'.*bad options"):
        fake.generate("abc", stop_conditions=("bad",))
    fake.unregister("bad-factory")

    def explode(register):
        raise KeyError("oops")

    fake.register(_plugin(register_cost_meters=explode), "exploding")
    with pytest.raises(PluginError, match="plugin 'exploding' failed in register_cost_meters"):
        fake.generate("abc", max_new_tokens=2)
    fake.unregister("exploding")
    assert fake.generate("abc", max_new_tokens=2).token_ids


def test_two_plugins_claiming_one_name(fake):
    fake.register(_plugin(register_strategies=lambda register: register("greedy", lambda p, o: None)), "impostor")
    with pytest.raises(PluginError, match="strategy 'greedy' is registered twice: by .* and by .*"):
        fake.generate("abc")
    fake.unregister("impostor")


def test_lifecycle_observers(fake):
    seen: list = []
    observer = _plugin(
        on_request_start=lambda state: seen.append(("start", state.request_id, len(state.prompts))),
        on_step=lambda state, tokens: seen.append(("step", state.step, tokens.shape)),
        on_request_end=lambda state, completions: seen.append(("end", [c.finish_reason for c in completions])),
    )
    assert fake.start("abc").pipeline.on_step is None  # nobody listens: the loop skips the hook
    fake.register(observer, "observer")
    fake.generate(["abc", "de"], max_new_tokens=4, ignore_eos=True)
    assert seen[0][0] == "start" and seen[0][2] == 2
    assert [s[1] for s in seen if s[0] == "step"] == [1, 2, 3, 4]
    assert seen[-1] == ("end", ["length", "length"])

    def broken_step(state, tokens):
        raise ValueError("observer broke")

    fake.register(_plugin(on_step=broken_step), "broken-observer")
    with pytest.raises(PluginError, match="plugin 'broken-observer' failed in on_step: ValueError: observer broke"):
        fake.generate("abc", max_new_tokens=3)
    fake.unregister("broken-observer")
    assert fake.generate("abc", max_new_tokens=3).token_ids


def test_a_package_can_name_its_tokenizer(tiny_llama, tmp_path):
    pkg = with_manifest(tiny_llama[1], tmp_path / "pkg", tokenizer="upper")
    with pytest.raises(nextoken.InvalidRequestError, match="unknown tokenizer 'upper'; registered: hf"):
        Engine(pkg, plugins=False)

    from nextoken.plugins.hf_tokenizer import HFTokenizer

    class Upper(HFTokenizer):
        def encode(self, text, add_special_tokens=True):
            return super().encode(text.upper(), add_special_tokens)

    plugin = _plugin(
        register_tokenizers=lambda register: register(
            "upper", lambda path, manifest: Upper.from_file(path / manifest.tokenizer_file)
        )
    )
    with Engine(pkg, device="cpu", plugins=False, extra_plugins=[plugin]) as engine:
        assert isinstance(engine.tokenizer, Upper)
        assert (
            engine.encode("abc") == engine.encode("ABC") != HFTokenizer.from_file(pkg / "tokenizer.json").encode("abc")
        )
        assert len(engine.generate("abc", max_new_tokens=3, ignore_eos=True).token_ids) == 3


def test_stop_strings_across_tokens_and_never_streamed_in_part(stories_engine):
    prompt = "Once upon a time"
    free = stories_engine.generate(prompt, max_new_tokens=40).text
    assert "girl named" in free
    stop = "girl named"
    streamed = ""
    for event in stories_engine.stream(prompt, max_new_tokens=40, stop=[stop, "never there"]):
        streamed += event.text
        assert "girl" not in streamed, "a partial stop string reached the client"
    got = stories_engine.generate(prompt, max_new_tokens=40, stop=[stop, "never there"])
    assert got.text == streamed == free[: free.index(stop)]
    assert got.finish_reason == "stop" and got.stop_detail == "stop string 'girl named'"
    ids = got.token_ids
    assert len(ids) < 40
    assert stop in stories_engine.tokenizer.decode(stories_engine.encode(prompt) + ids)


def test_seeded_sampling_on_the_real_model(stories_engine):
    kw = dict(max_new_tokens=48, temperature=0.9, top_k=40, top_p=0.95, seed=42)
    a = stories_engine.generate("Once upon a time", **kw)
    b = stories_engine.generate("Once upon a time", **kw)
    c = stories_engine.generate("Once upon a time", **{**kw, "seed": 43})
    greedy = stories_engine.generate("Once upon a time", max_new_tokens=48)
    assert a.text == b.text and a.token_ids == b.token_ids
    assert c.token_ids != a.token_ids and a.token_ids != greedy.token_ids
    # independent of the batch it runs in
    batch = stories_engine.generate(["The dog", "Once upon a time", "Tom"], **kw)
    assert batch[1].token_ids == a.token_ids
    assert batch[0].token_ids == stories_engine.generate("The dog", **kw).token_ids


def test_greedy_through_the_plugin_path_and_repetition_penalty_match_transformers(stories_engine, stories_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ids = stories_engine.encode("Once upon a time")
    with torch.no_grad():
        plain = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids) :].tolist()
        penalised = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, repetition_penalty=1.3)[
            0, len(ids) :
        ].tolist()
    assert stories_engine.generate(ids, max_new_tokens=40, strategy="greedy").token_ids == plain
    got = stories_engine.generate(ids, max_new_tokens=40, repetition_penalty=1.3).token_ids
    assert got == penalised and got != plain


def test_top_logprobs(stories_engine):
    ids = stories_engine.encode("Once upon a time")
    got = stories_engine.generate(ids, max_new_tokens=6, top_logprobs=5)
    assert stories_engine.generate(ids, max_new_tokens=6).logprobs is None  # off unless asked
    first = got.logprobs[0]
    logits = stories_engine.forward(ids)[-1].astype(np.float64)
    expected = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert first.token_id == got.token_ids[0] == int(np.argmax(logits))
    assert first.logprob == pytest.approx(expected[first.token_id], abs=1e-4)
    assert [t[0] for t in first.top] == np.argsort(-expected)[:5].tolist()
    assert first.top[0][2] >= first.top[1][2] >= first.top[4][2]
    assert sum(np.exp(lp) for _, _, lp in first.top) <= 1.0 + 1e-6
    assert first.token == ","
    events = list(stories_engine.stream(ids, max_new_tokens=6, top_logprobs=2))
    assert [e.logprob.token_id for e in events] == got.token_ids
    data = got.to_dict()
    assert data["logprobs"][0]["top_logprobs"][0]["token_id"] == first.token_id


def test_deadline(engine):
    got = engine.generate("abc", max_new_tokens=100, ignore_eos=True, deadline_s=1e-6)
    assert got.finish_reason == "deadline" and len(got.token_ids) == 1


def test_cost_meters_and_the_daily_projection(engine):
    from nextoken import Usage

    usage = Usage(
        prompt_tokens=1000,
        completion_tokens=500,
        time_to_first_token_ms=1,
        prefill_ms=1,
        decode_tokens_per_s=1,
        wall_ms=3_600_000,
        model_ms=1,
        steps=500,
        batch_size=1,
        device="cpu",
    )
    per_token = engine.plugins.provided("cost_meter")["per_token"].make(
        {"input_per_million": 2.0, "output_per_million": 16.0}
    )
    charge = per_token(usage)
    assert charge.amount == pytest.approx(0.01)  # $0.01 an answer
    daily = project(charge.amount, answers_per_day=1_000_000)
    assert daily["per_day"] == pytest.approx(10_000.0)  # is $10,000 a day
    hourly = engine.plugins.provided("cost_meter")["device_hour"].make({"hourly_rate": 2.5})
    assert hourly(usage).amount == pytest.approx(2.5)
    # configured on the engine, every completion carries the charge
    with Engine(
        engine.path,
        device="cpu",
        plugins=False,
        cost_meters={"per_token": {"input_per_million": 1e6, "output_per_million": 2e6}},
    ) as priced:
        got = priced.generate("abcd", max_new_tokens=3, ignore_eos=True)
        assert got.cost["per_token"].amount == pytest.approx(5 * 1 + 3 * 2)
        assert got.to_dict()["cost"]["per_token"]["currency"] == "USD"


# -- a third-party plugin package, installed and found by its entry point ---------------------------


@pytest.fixture(scope="module")
def installed_example():
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        pip + ["install", "--no-deps", "--no-build-isolation", "-q", str(EXAMPLE)], check=True, capture_output=True
    )
    import importlib

    importlib.invalidate_caches()
    yield "nextoken-example-plugin"
    subprocess.run(pip + ["uninstall", "-y", "-q", "nextoken-example-plugin"], capture_output=True)


def test_example_plugin_found_by_entry_point_and_used_by_name(installed_example, stories_package):
    with Engine(stories_package, device="cpu") as engine:
        row = next(r for r in engine.plugins.listing() if r["plugin"] == "example")
        assert row["distribution"] == installed_example
        assert row["provides"] == {
            "logits_processor": ["no_repeat_ngram"],
            "stop_condition": ["regex"],
            "cost_meter": ["energy"],
        }
        base = dict(max_new_tokens=120)
        free = engine.generate("Once upon a time", **base)
        got = engine.generate(
            "Once upon a time",
            processors=("no_repeat_ngram",),
            options={"no_repeat_ngram": {"n": 2}, "regex": {"pattern": r"\bball\b"}},
            stop_conditions=("regex",),
            cost_meters={"energy": {"watts": 100}},
            **base,
        )
        seq = engine.encode("Once upon a time") + got.token_ids
        bigrams = list(itertools.pairwise(seq))
        assert len(bigrams) == len(set(bigrams))  # no bigram repeats
        assert got.token_ids != free.token_ids
        assert got.finish_reason == "stop" and got.stop_detail.startswith("regex")
        assert "ball" not in got.text
        assert got.cost["energy"].amount > 0
    with Engine(stories_package, device="cpu", plugins=False) as engine:
        assert "example" not in {r["plugin"] for r in engine.plugins.listing()}


def test_plugins_cli_lists_the_distribution_and_the_env_var_limits_it(installed_example):
    out = run_cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["plugin"]: r for r in json.loads(out.stdout)}
    assert rows["example"]["distribution"] == installed_example
    off = run_cli("plugins", "--json", env={"NEXTOKEN_PLUGINS": "none"})
    assert "example" not in {r["plugin"] for r in json.loads(off.stdout)}
    only = run_cli("plugins", env={"NEXTOKEN_PLUGINS": "example"})
    assert "example  [nextoken-example-plugin]" in only.stdout


def test_cli_uses_the_example_plugin(installed_example, stories_package):
    out = run_cli(
        "generate",
        str(stories_package),
        "Once upon a time",
        "--max-new-tokens",
        "60",
        "--processor",
        "no_repeat_ngram",
        "--option",
        "no_repeat_ngram.n=3",
        "--stop-condition",
        "regex",
        "--option",
        r"regex.pattern=\bpark\b",
        "--cost",
        "energy",
        "--option",
        "energy.watts=65",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["stop_detail"].startswith("regex") and "park" not in data["text"]
    assert data["cost"]["energy"]["amount"] > 0
