"""Constrained decoding (the built-in ``structured`` plugin on llguidance): JSON schema, JSON object,
regex, choice and Lark grammar, in the SDK, the CLI and the server; bad constraints refused before
any work; requests without one pay nothing."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from helpers import run_cli, wrap_steps
from nextoken import InvalidRequestError, Scheduler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "town": {"type": "string", "maxLength": 10},
                "floor": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["town"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pets", "home"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
PROMPTS = ["Once upon a time", "The dog", "Lily and Ben", "Tom had a red ball"]


def test_100_generations_under_a_json_schema_all_validate(stories_engine):
    got = stories_engine.generate(
        PROMPTS, max_new_tokens=150, response_format=JSON_SCHEMA, temperature=1.0, seed=1, n=25
    )
    assert len(got) == 100 and len({c.text for c in got}) > 50  # sampled: varied, yet all valid
    for completion in got:
        jsonschema.validate(json.loads(completion.text), SCHEMA)
        assert completion.finish_reason == "stop"


def test_json_object_regex_and_choice_always_hold(stories_engine):
    # a story model writes its story into an object's first key: the object holds, it just does not end
    objects = stories_engine.generate(
        PROMPTS[:2], max_new_tokens=30, response_format={"type": "json_object"}, temperature=0.8, seed=3, n=5
    )
    assert all(c.text.startswith('{"') for c in objects)
    assert all(isinstance(json.loads(c.text), dict) for c in objects if c.finish_reason == "stop")
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    for c in stories_engine.generate(PROMPTS, max_new_tokens=20, regex=pattern, temperature=1.0, seed=5, n=5):
        assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", c.text
    options = ["yes", "no", "only on Sundays"]
    picked = stories_engine.generate(PROMPTS, max_new_tokens=20, choice=options, temperature=1.0, seed=7, n=5)
    assert all(c.text in options and c.finish_reason == "stop" for c in picked)
    assert {c.stop_detail for c in picked} == {"the grammar is complete"}


def test_a_grammar_that_finishes_ends_the_sequence(stories_engine):
    grammar = 'start: "The " animal " is " colour "."\nanimal: "cat" | "dog"\ncolour: "red" | "blue"'
    got = stories_engine.generate("Once upon a time", max_new_tokens=40, grammar=grammar, temperature=1.0, seed=2)
    assert re.fullmatch(r"The (cat|dog) is (red|blue)\.", got.text) and got.finish_reason == "stop"


def test_constrained_sampling_is_reproducible_and_the_same_in_a_batch_and_alone(stories_engine):
    kw = dict(max_new_tokens=80, response_format=JSON_SCHEMA, temperature=0.9, seed=11)
    alone = [stories_engine.generate(p, **kw).text for p in PROMPTS]
    assert alone == [stories_engine.generate(p, **kw).text for p in PROMPTS]
    assert [c.text for c in stories_engine.generate(PROMPTS, **kw)] == alone
    scheduler = Scheduler(stories_engine, max_batch=4)
    handles = [scheduler.submit(p, **kw) for p in PROMPTS]
    while scheduler.step():
        pass
    assert [h.result().text for h in handles] == alone


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(regex="("), "(?s)the regular expression cannot be used: .*unclosed group"),
        (dict(grammar="start: x"), "(?s)the grammar cannot be used: .*unknown name"),
        (
            dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}),
            "the JSON schema cannot be used: Invalid type: strin",
        ),
        (dict(response_format={"type": "xml"}), "response_format must be"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "needs 'json_schema'"),
        (dict(regex="a", choice=["b"]), "give one constraint at most, not regex and choice"),
        (dict(choice=["ok", ""]), "choice must be a list of non-empty strings"),
    ],
)
def test_bad_constraints_are_refused_before_any_work(stories_engine, monkeypatch, kw, words):
    steps = []
    wrap_steps(monkeypatch, stories_engine.runner, lambda kind, real, *a: steps.append(kind) or real(*a))
    with pytest.raises(InvalidRequestError, match=words):
        stories_engine.generate("Hello", max_new_tokens=4, **kw)
    assert steps == []


def test_requests_without_a_constraint_pay_nothing(stories_engine):
    gen = stories_engine.start("Hello", max_new_tokens=2)
    assert all(p.provided.name != "structured" for p in gen.pipeline.processors + gen.pipeline.stops)
    constrained = stories_engine.start("Hello", max_new_tokens=2, regex="[a-z]+")
    assert constrained.pipeline.processors[0].provided.name == "structured"  # masks first


def test_cli_constraints(stories_package, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    got = run_cli(
        "generate",
        str(stories_package),
        "Once upon a time",
        "--json-schema",
        str(schema),
        "--max-new-tokens",
        "150",
        "--json",
    )
    assert got.returncode == 0, got.stderr
    jsonschema.validate(json.loads(json.loads(got.stdout)["text"]), SCHEMA)
    picked = run_cli("generate", str(stories_package), "Hi", "--choice", "left", "--choice", "right")
    assert picked.returncode == 0 and picked.stdout.strip() in ("left", "right")
    (tmp_path / "bad.json").write_text("{nope")
    bad = run_cli("generate", str(stories_package), "Hi", "--json-schema", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "--json-schema" in bad.stderr and "is not JSON" in bad.stderr


def test_bench_constrained_runs_under_a_json_schema(tiny_llama):
    out = run_cli(
        "bench",
        str(tiny_llama[1]),
        "--constrained",
        "--batch",
        "1",
        "--prompt-tokens",
        "8",
        "--new",
        "8",
        "--repeat",
        "1",
    )
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[2:]] == ["greedy", "json"]
