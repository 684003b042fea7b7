"""Reasoning models: the thinking between <think> and </think> split off the answer, whole and as
it streams, its tokens counted; in Engine.chat and through the server (reasoning_content, streamed
as its own deltas, reasoning_tokens in usage), with chat_template_kwargs passed to the template;
gpt-oss's channels (special tokens kept in the text) split the same way, its calls read as calls."""

from __future__ import annotations

import json

import openai
import pytest

import nextoken
from helpers import ANSWER, THOUGHT, forcing, thinking_server
from nextoken import Engine, InvalidRequestError, ThinkTags
from nextoken.reasoning import count_reasoning_tokens, pick_parser, split
from nextoken.testing import CharTokenizer, FakeEngine, ScriptedModel

CASES = [
    ("<think>hmm</think>yes", "", ("hmm", "yes")),
    ("<think>\nhmm\n</think>\n\nyes", "", ("hmm", "yes")),
    ("  <think>a</think>b", "", ("a", "b")),
    ("just an answer", "", (None, "just an answer")),
    ("hmm</think>yes", "<|assistant|>\n<think>\n", ("hmm", "yes")),  # the template opened it
    ("<think>cut short", "", ("cut short", "")),
    ("<thin", "", (None, "<thin")),
    ("a < b", "", (None, "a < b")),
]


@pytest.mark.parametrize("text, tail, want", CASES)
def test_think_tags_split_whole_and_streamed_alike(text, tail, want):
    parser = ThinkTags()
    assert split(parser, text, tail) == want
    for cut in range(len(text) + 1):  # any two pieces, and one character at a time
        for pieces in ([text[:cut], text[cut:]], list(text)):
            splitter = parser.splitter(tail)
            got = [splitter.feed(p) for p in pieces] + [splitter.flush()]
            reasoning, content = "".join(r for r, _ in got), "".join(c for _, c in got)
            assert ((reasoning.strip() or None), content) == want, (pieces, reasoning, content)


def test_reasoning_tokens_are_those_before_the_answer():
    parser = ThinkTags()
    assert count_reasoning_tokens(["<think>", "h", "mm", "</think>", "\n", "yes"], parser) == 5  # all before the answer
    assert count_reasoning_tokens(["no", " thinking"], parser) == 0
    assert count_reasoning_tokens(["h", "m", "</think>y"], parser, "<think>") == 3
    assert pick_parser("auto", "{{ x }}</think>") == "think" and pick_parser("auto", "{{ x }}") is None
    assert pick_parser("none", "</think>") is None and pick_parser("think", None) == "think"


ALPHABET = "\0\n abcdefghijklmnopqrstuvwxyz.,!?<>/"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{# a thinking model: </think> #}"


def _thinking_engine(answer: str) -> FakeEngine:
    tok = CharTokenizer(ALPHABET)
    engine = FakeEngine(
        ScriptedModel(tok.encode(answer) + [0], vocab_size=len(ALPHABET)), tokenizer=tok, eos_token_ids=(0,)
    )
    engine.chat_template_override = TEMPLATE
    return engine


def test_engine_chat_splits_the_thinking_and_reads_tools_after_it():
    engine = _thinking_engine("<think>hmm</think>yes")
    got = engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=30)
    assert (got.reasoning, got.text, got.usage.reasoning_tokens) == ("hmm", "yes", len("<think>hmm</think>"))
    plain = engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=30, reasoning=None)
    assert plain.reasoning is None and plain.text.startswith("<think>hmm</think>yes")
    with pytest.raises(
        nextoken.InvalidRequestError, match="unknown reasoning parser 'thought'; registered: harmony, think"
    ):
        engine.chat([{"role": "user", "content": "hi"}], reasoning="thought")


def test_chat_template_kwargs_reach_the_template_and_bad_names_are_refused():
    tok = CharTokenizer(ALPHABET)
    engine = FakeEngine(ScriptedModel([5], vocab_size=len(ALPHABET)), tokenizer=tok)
    engine.chat_template_override = "{% if thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    ids = engine.apply_chat_template([{"role": "user", "content": "hi"}], template_kwargs={"thinking": True})
    assert tok.decode(ids) == "<think>hi"
    for bad in ({"messages": []}, {"not a name": 1}, {"x": object()}):
        with pytest.raises(InvalidRequestError) as caught:
            engine.apply_chat_template([{"role": "user", "content": "hi"}], template_kwargs=bad)
        assert caught.value.param == "chat_template_kwargs"


def test_reasoning_content_through_the_server(stories_package, tmp_path):
    body = dict(
        model="thinker",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=60,
        extra_body={"nextoken": {"processors": ["force"]}},
    )
    with thinking_server(stories_package, tmp_path / "thinker") as (client, *_):
        got = client.chat.completions.create(**body)
        message = got.choices[0].message
        assert (message.reasoning_content, message.content) == (THOUGHT, ANSWER)
        assert 0 < got.usage.completion_tokens_details.reasoning_tokens < got.usage.completion_tokens
        thought = said = ""
        for chunk in client.chat.completions.create(stream=True, **body):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None:
                thought += getattr(delta, "reasoning_content", None) or ""
                said += delta.content or ""
        assert (thought, said) == (THOUGHT, ANSWER)
        off = client.chat.completions.create(
            **{**body, "extra_body": {"nextoken": {"processors": ["force"], "reasoning_parser": "none"}}}
        )
        assert off.choices[0].message.content.strip() == f"<think>{THOUGHT}</think>{ANSWER}"  # as written
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**{**body, "extra_body": {"chat_template_kwargs": {"messages": 1}}})
        assert caught.value.body["param"] == "chat_template_kwargs"


def test_a_constraint_holds_after_the_thinking_not_on_it(stories_package, tmp_path):
    """With a reasoning parser, structured output and tool calls apply to the answer after the
    thinking: the thinking is free, the answer held to the constraint (the forced thinking model
    writes <think>...</think> first; a constraint from the first token would refuse it)."""
    body = dict(
        model="thinker",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=60,
        extra_body={"nextoken": {"processors": ["force"], "regex": "A (dog|cat)\\."}},
    )
    with thinking_server(stories_package, tmp_path / "thinker") as (client, *_):
        got = client.chat.completions.create(**body)
        message = got.choices[0].message
        assert (message.reasoning_content, message.content) == (THOUGHT, ANSWER)
        assert got.choices[0].finish_reason == "stop"
        # without the parser the constraint holds from the first token, and the forced "<think>" breaks it
        off = {**body, "extra_body": {"nextoken": {**body["extra_body"]["nextoken"], "reasoning_parser": "none"}}}
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(**off)


@pytest.mark.parametrize(
    ("start", "accepted", "refused"),
    [
        ("<think>", ["<think>any { text</think>\n\nyes", "yes", "  yes"], ["no", "<think>x</think>no"]),
        ("", ["any text</think>yes", "</think>\nyes"], ["yes", "x</think>no"]),  # the prompt opened it
    ],
)
def test_the_grammar_after_thinking(stories_engine, start, accepted, refused):
    import llguidance

    from nextoken.plugins.structured import _vocabulary, after_thinking

    class State:
        tokenizer, vocab_size, eos_token_ids = stories_engine.intake.tokenizer, stories_engine.manifest.vocab_size, [2]

    grammar = after_thinking('start: "yes"', start, "</think>")
    vocab = _vocabulary(State())

    def follows(text: str) -> bool:
        matcher = llguidance.LLMatcher(vocab, grammar, log_level=0)
        ids = stories_engine.intake.tokenizer.encode(text, add_special_tokens=False)
        return matcher.consume_tokens(ids) and not matcher.is_error() and matcher.is_accepting()

    assert all(follows(t) for t in accepted), [t for t in accepted if not follows(t)]
    assert not any(follows(t) for t in refused), [t for t in refused if follows(t)]


#: gpt-oss's markup, as special tokens of a tiny byte tokenizer
HARMONY = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")
HARMONY_TEMPLATE = (
    "{% if tools %}<|start|>developer<|message|>{% for t in tools %}{{ t.function.name }} {% endfor %}<|end|>"
    "{% endif %}{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}{# <|channel|> #}"
)
HARMONY_ANSWER = "<|channel|>analysis<|message|>The cat.<|end|><|start|>assistant<|channel|>final<|message|>A dog."
HARMONY_CALL = (
    "<|channel|>analysis<|message|>Weather.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "unit": "C"}<|call|>'
)

HARMONY_CASES = [
    (HARMONY_ANSWER, ("The cat.", "A dog.")),
    ("just an answer", (None, "just an answer")),
    ("<|channel|>final<|message|>Only this.<|return|>", (None, "Only this.")),
    (
        HARMONY_CALL,
        ("Weather.", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>'),
    ),
    ("<|channel|>analysis<|message|>cut sh", ("cut sh", "")),
]


@pytest.mark.parametrize("text, want", HARMONY_CASES)
def test_harmony_channels_split_whole_and_streamed_alike(text, want):
    parser = nextoken.Harmony()
    assert split(parser, text) == want
    for size in (1, 2, 3, 7):
        splitter = parser.splitter("")
        got = [splitter.feed(text[i : i + size]) for i in range(0, len(text), size)] + [splitter.flush()]
        thought, said = "".join(g[0] for g in got), "".join(g[1] for g in got)
        assert ((thought.strip() or None), said) == want, size


@pytest.fixture(scope="module")
def harmony_package(tmp_path_factory):
    """A tiny model whose tokenizer has gpt-oss's markup as special tokens, with a template that
    writes it (so ``auto`` picks ``harmony``)."""
    from nextoken.exporters import export, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("harmony")
    ckpt = make_tiny_checkpoint(root / "ckpt", "llama", special_tokens=HARMONY, max_position_embeddings=512)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HARMONY_TEMPLATE}))
    export(ckpt, root / "pkg", progress=None)
    return root / "pkg"


def harmony_forcing(engine, text: str):
    """A plugin that makes the model say ``text`` (its ids, specials included), then end."""
    ids = engine.encode(text)[1:]
    assert engine.intake.need_tokenizer().decode(ids, skip_special_tokens=False) == text
    return forcing(ids, engine.eos_token_ids[0])


def test_gpt_oss_channels_in_chat_and_tool_calls(harmony_package):
    from test_toolcalls import TOOLS

    with Engine(harmony_package, plugins=False) as engine:
        engine.register(harmony_forcing(engine, HARMONY_ANSWER), "answer")
        ask = [{"role": "user", "content": "Hi"}]
        got = engine.chat(ask, max_new_tokens=80, processors=["force"])
        assert (got.reasoning, got.text) == ("The cat.", "A dog.")
        assert 0 < got.usage.reasoning_tokens < got.usage.completion_tokens
        plain = engine.chat(ask, max_new_tokens=80, processors=["force"], reasoning=None)
        assert plain.text == "analysisThe cat.assistantfinalA dog."  # no parser: the specials are left out
        engine.unregister("answer")
        engine.register(harmony_forcing(engine, HARMONY_CALL), "call")
        got = engine.chat(ask, tools=TOOLS, max_new_tokens=120, processors=["force"])
        assert got.reasoning == "Weather." and got.finish_reason == "tool_calls" and got.text == ""
        assert [(c.name, c.parsed_arguments()) for c in got.tool_calls] == [
            ("get_weather", {"city": "Paris", "unit": "C"})
        ]
        with pytest.raises(InvalidRequestError, match="not yet held inside gpt-oss's channels"):
            engine.chat(ask, tools=TOOLS, tool_choice="required", max_new_tokens=8)


def test_gpt_oss_channels_through_the_server(harmony_package):
    from test_toolcalls import TOOLS

    from helpers import serving

    with Engine(harmony_package, plugins=False) as probe:
        plugin = harmony_forcing(probe, HARMONY_CALL)
    body = dict(
        model="oss",
        messages=[{"role": "user", "content": "Hi"}],
        tools=TOOLS,
        max_tokens=120,
        extra_body={"nextoken": {"processors": ["force"]}},
    )
    with serving(harmony_package, "oss", engine_options={"extra_plugins": [plugin]}) as (client, *_):
        got = client.chat.completions.create(**body)
        message = got.choices[0].message
        assert message.reasoning_content == "Weather." and got.choices[0].finish_reason == "tool_calls"
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "C"}
        thought, calls = "", []
        for chunk in client.chat.completions.create(stream=True, **body):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None:
                thought += getattr(delta, "reasoning_content", None) or ""
                calls += delta.tool_calls or []
        assert thought == "Weather." and calls[0].function.name == "get_weather"
        assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris", "unit": "C"}


def test_a_tokenizer_that_cannot_keep_special_tokens_says_so():
    from nextoken.tokenizer import GuardedTokenizer, decoder_for

    guarded = GuardedTokenizer(CharTokenizer(), "chars", 40)
    assert guarded.decode([3, 4]) == "ab"
    with pytest.raises(InvalidRequestError, match="cannot keep special tokens.*leave skip_special_tokens on"):
        decoder_for(guarded, [], skip_special_tokens=False).add(3)
