"""Chat: the model's template, rendered in a sandbox, equal to transformers' apply_chat_template."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, with_chat_template
from nextoken import Engine, InvalidRequestError, ModelPackageError

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "A story about a fox, please. 🦊"},
]


@pytest.fixture(scope="module")
def chat_package(tiny_llama, tmp_path_factory):
    return with_chat_template(tiny_llama[1], tmp_path_factory.mktemp("chat") / "pkg", TEMPLATE)


def test_template_ids_equal_transformers(chat_package):
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(chat_package).apply_chat_template(MESSAGES, add_generation_prompt=True)
    with Engine(chat_package, device="cpu") as engine:
        assert engine.apply_chat_template(MESSAGES) == list(expected)
        got = engine.chat(MESSAGES, max_new_tokens=6, ignore_eos=True)
        assert got.prompt_token_ids == list(expected) and len(got.token_ids) == 6


def test_template_errors_and_bad_messages(chat_package):
    with Engine(chat_package, device="cpu") as engine:
        with pytest.raises(InvalidRequestError, match="system message must come first"):
            engine.chat(MESSAGES[::-1])
        with pytest.raises(InvalidRequestError, match="messages must be a non-empty list"):
            engine.chat("hello")
        with pytest.raises(InvalidRequestError, match="message 0 must be a dict with string 'role' and 'content'"):
            engine.chat([{"role": "user"}])
        assert engine.chat(MESSAGES, max_new_tokens=2).token_ids


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% set _ = messages.append({'role': 'x', 'content': 'y'}) %}",
        "{{ messages[0].content.__class__.__init__.__globals__ }}",
    ],
)
def test_the_sandbox_keeps_templates_away_from_python(chat_package, tmp_path, template):
    with Engine(with_chat_template(chat_package, tmp_path / "evil", template), device="cpu") as engine:
        with pytest.raises(ModelPackageError, match="unsafe"):
            engine.apply_chat_template(MESSAGES)


def test_a_model_without_a_template(stories_engine):
    with pytest.raises(ModelPackageError, match="no chat template"):
        stories_engine.chat(MESSAGES)
    assert stories_engine.generate("Once", max_new_tokens=3).token_ids


def test_cli_chat(chat_package, stories_package):
    out = run_cli(
        "chat",
        str(chat_package),
        "Tell me a story",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 5
    bad = run_cli("chat", str(stories_package), "hi")
    assert bad.returncode == 1 and "no chat template" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_sampling_flags(stories_package):
    args = [
        "generate",
        str(stories_package),
        "Once upon a time",
        "--max-new-tokens",
        "30",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "7",
        "--json",
    ]
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    stop = run_cli("generate", str(stories_package), "Once upon a time", "--stop", "Lily", "--stop", "zzz")
    assert stop.returncode == 0 and "Lily" not in stop.stdout and stop.stderr.startswith("[stop]")
    lp = run_cli("generate", str(stories_package), "Once upon a time", "--max-new-tokens", "3", "--top-logprobs", "2")
    assert lp.returncode == 0 and "'there'" in lp.stderr
    cost = run_cli(
        "generate",
        str(stories_package),
        "Once upon a time",
        "--max-new-tokens",
        "3",
        "--cost",
        "per_token",
        "--option",
        "per_token.input_per_million=1000000",
        "--option",
        "per_token.output_per_million=0",
    )
    assert cost.stderr.strip().endswith("cost 5 USD (per_token)")
    for bad_args, words in (
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-k", "5"], "top_k only matters when sampling"),
        (["--option", "nodot"], "must look like NAME.KEY=VALUE"),
        (["--strategy", "beam"], "unknown strategy 'beam'; registered: greedy, sample"),
    ):
        bad = run_cli("generate", str(stories_package), "hi", *bad_args)
        assert bad.returncode == 1 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize(
    "template, words",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x", "ran past 2 s"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "rendered over"),
        ("{{ 'x' * 10**9 }}", "over"),
        ("{{ 9 ** 99999999 }}", "to the power"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ],
)
def test_a_template_that_runs_away_is_stopped(chat_package, tmp_path, template, words):
    import time as _time

    with Engine(with_chat_template(chat_package, tmp_path / "runaway", template), device="cpu") as engine:
        start = _time.perf_counter()
        with pytest.raises(ModelPackageError, match=words):
            engine.apply_chat_template(MESSAGES)
        assert _time.perf_counter() - start < 10
        assert engine.generate("still works", max_new_tokens=2, ignore_eos=True).token_ids
