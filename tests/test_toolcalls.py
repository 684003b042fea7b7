"""Tool calls, OpenAI-shaped: tools rendered through the model's chat template (or nextoken's
fallback), ``tool_choice`` none / auto / required / a named function (the last two held by a
grammar), calls parsed into ``tool_calls`` with arguments that match each tool's schema, in the SDK
and through the official openai client, streamed and not."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from helpers import serving, with_chat_template
from nextoken import Engine, InvalidRequestError
from nextoken.toolcalls import CallStream, ToolRequest

#: a template that takes tools, as transformers passes them
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>You may call:{% for t in tools %} {{ t.function.name }}{% endfor %}\n"
    "{% endif %}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_package(stories_package, tmp_path_factory):
    return with_chat_template(stories_package, tmp_path_factory.mktemp("tools") / "pkg", TOOLS_TEMPLATE)


@pytest.fixture(scope="module")
def tool_engine(tool_package):
    with Engine(tool_package, plugins=False) as engine:
        yield engine


def _valid(calls) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(call.parsed_arguments(), SCHEMAS[call.name])
        assert call.id.startswith("call_")


def test_required_and_named_tool_choice_give_valid_calls(tool_engine):
    for seed in range(5):
        got = tool_engine.chat(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=120, temperature=1.0, seed=seed)
        assert got.finish_reason == "tool_calls" and got.text == ""
        _valid(got.tool_calls)
        named = tool_engine.chat(
            ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            max_new_tokens=120,
            temperature=1.0,
            seed=seed,
        )
        assert [c.name for c in named.tool_calls] == ["add"]
        _valid(named.tool_calls)


def test_the_template_receives_the_tools_and_none_leaves_them_out(tool_engine):
    request = ToolRequest(TOOLS)
    with_tools = tool_engine.decode(tool_engine.apply_chat_template(ASK, tools=request))
    assert "You may call: get_weather add" in with_tools
    assert "You may call" not in tool_engine.decode(
        tool_engine.apply_chat_template(ASK, tools=ToolRequest(TOOLS, "none"))
    )
    plain = tool_engine.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=8)
    assert plain.tool_calls is None and plain.text == tool_engine.chat(ASK, max_new_tokens=8).text


def test_auto_parses_calls_out_of_the_answer():
    request = ToolRequest(TOOLS, parallel_tool_calls=True)
    text, calls = request.parse(
        'Let me check. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}</tool_call>'
    )
    assert text == "Let me check." and [c.name for c in calls] == ["add", "get_weather"]
    assert calls[0].parsed_arguments() == {"a": 1, "b": 2}
    assert request.parse('{"name": "add", "arguments": {"a": 3, "b": 4}}')[1][0].name == "add"  # a bare call
    assert request.parse('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')[1] == []  # not a tool
    assert request.parse("just words") == ("just words", [])
    single = ToolRequest(TOOLS, parallel_tool_calls=False)
    assert len(single.parse('<tool_call>{"name": "add", "arguments": {}}</tool_call>' * 2)[1]) == 1


def test_parallel_calls_with_required(tool_engine):
    got = tool_engine.chat(
        ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=True, max_new_tokens=200, temperature=1.0, seed=3
    )
    _valid(got.tool_calls)
    single = ToolRequest(TOOLS, "required", parallel_tool_calls=False).grammar()
    assert single.startswith("start: call\n") and ToolRequest(TOOLS, "required").grammar().startswith("start: call+")


@pytest.mark.parametrize(
    "kw, words, field",
    [
        (dict(tools=[]), "tools must be a non-empty list", "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "with a name of letters", "tools"),
        (dict(tools=TOOLS + TOOLS[:1]), "'get_weather' is given twice", "tools"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be", "tool_choice"),
        (
            dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}}),
            "names function 'fly'",
            "tool_choice",
        ),
        (dict(tools=TOOLS, tool_choice="required", regex="x"), "constrains the answer to tool calls", "tool_choice"),
        (dict(tool_choice="required"), "tool_choice needs tools", "tool_choice"),
    ],
)
def test_bad_tool_requests(tool_engine, kw, words, field):
    """The library and the server take one path (ToolRequest.of, Engine.chat_prompt): the same
    refusals, each naming the field the server's 400 names."""
    with pytest.raises(InvalidRequestError, match=words) as caught:
        tool_engine.chat(ASK, max_new_tokens=4, **kw)
    assert caught.value.param == field


def test_a_template_without_tools_needs_the_fallback(stories_package, tmp_path):
    pkg = with_chat_template(stories_package, tmp_path / "plain", PLAIN_TEMPLATE)
    with Engine(pkg, plugins=False) as engine:
        with pytest.raises(InvalidRequestError, match="does not take tools; ask for nextoken's fallback"):
            engine.chat(ASK, tools=TOOLS)
        prompt = engine.decode(engine.apply_chat_template(ASK, tools=ToolRequest(TOOLS, fallback=True)))
        assert prompt.startswith("<|system|>You can call these tools:") and '"name":"add"' in prompt
        # (this model's 512-token window holds the fallback's system message for one small tool)
        got = engine.chat(ASK, tools=TOOLS[1:], tool_choice="required", tool_fallback=True, max_new_tokens=60, seed=1)
        _valid(got.tool_calls)


def test_tool_calls_through_the_openai_client(tool_package):
    with serving(tool_package, "tools") as (client, *_):
        got = client.chat.completions.create(
            model="tools", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=2
        )
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        named = client.chat.completions.create(
            model="tools",
            messages=ASK,
            tools=TOOLS,
            max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_weather"]
        stream = client.chat.completions.create(
            model="tools",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=120,
            temperature=1.0,
            seed=2,
            stream=True,
        )
        calls, finish, pieces = {}, None, 0
        for chunk in stream:
            for delta_call in chunk.choices[0].delta.tool_calls or []:
                pieces += 1
                name, arguments = calls.get(delta_call.index, (None, ""))
                if delta_call.id is not None:  # the call's first delta: its id and name
                    assert name is None and delta_call.function.name and delta_call.id.startswith("call_")
                    name = delta_call.function.name
                calls[delta_call.index] = (name, arguments + (delta_call.function.arguments or ""))
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert pieces > 2 * len(calls)  # the arguments came in fragments, as they were generated
        assert list(calls.values()) == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        answered = client.chat.completions.create(
            model="tools",
            max_tokens=10,
            tools=TOOLS,
            messages=ASK
            + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [c.model_dump() for c in choice.message.tool_calls],
                },
                {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "18 C, sunny"},
            ],
        )
        assert answered.choices[0].finish_reason in ("stop", "length", "tool_calls")
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tools", prompt="x", extra_body={"tools": TOOLS})
        assert "use /v1/chat/completions" in err.value.body["message"]
        for body, words in (
            ({"tools": []}, "tools must be a non-empty list"),
            ({"tool_choice": "auto"}, "tool_choice needs tools"),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model="tools", messages=ASK, max_tokens=2, extra_body=body)
            assert words in err.value.body["message"]


def test_tool_parameters_with_refs_as_pydantic_writes_them(tool_engine):
    """A schema with $defs and $ref (what pydantic's model_json_schema emits) holds under required:
    its definitions move to the calls' schema root, renamed for the tool, references with them."""
    place = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    parameters = {
        "$defs": {"Place": place},
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["where", "unit"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": parameters}}]
    grammar = ToolRequest(tools, "required").grammar()
    assert '"#/$defs/forecast__Place"' in grammar and '"#/$defs/Place"' not in grammar
    got = tool_engine.chat(ASK, tools=tools, tool_choice="required", max_new_tokens=80, temperature=1.0, seed=1)
    assert got.finish_reason == "tool_calls"
    for call in got.tool_calls:
        jsonschema.validate(call.parsed_arguments(), parameters)


STREAMED = [
    'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Pa}ris", "unit": "C"}}</tool_call> and '
    '<tool_call>{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "]"}]}}</tool_call> done',
    '{"name": "add", "arguments": {"a": 1, "b": 2}}',
    'text <tool_call>{"arguments": {}, "name": "add"}</tool_call>',
    'text <tool_call>{"name": "fly", "arguments": {}}</tool_call> end',
    "no calls <tool_c",
    '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}',  # Llama 3.x
    '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {"city": "X"}}]',
    "[1, 2, 3] is a list, not calls",
]


@pytest.mark.parametrize("text", STREAMED)
def test_calls_stream_as_they_form_and_agree_with_the_whole_answer(text):
    """CallStream, fed the answer in pieces of any size, finds the calls and text parse() finds in
    the whole; a call whose head is known streams its arguments in fragments."""
    request = ToolRequest(TOOLS, "auto")
    whole_text, whole_calls = request.parse(text)
    for size in (1, 2, 5, len(text)):
        stream = CallStream(request)
        pieces = [p for i in range(0, len(text), size) for p in stream.feed(text[i : i + size])] + stream.flush()
        assert [(c.name, json.loads(c.arguments)) for c in stream.calls] == [
            (c.name, json.loads(c.arguments)) for c in whole_calls
        ]
        assert " ".join(stream.text.split()) == " ".join(whole_text.split())
        if size == 1 and text.startswith("Sure"):
            assert [p[0] for p in pieces].count("arguments") > 10  # character by character


def test_the_formats_other_templates_teach():
    """Llama 3.x's bare object with "parameters", Mistral's list after [TOOL_CALLS]: read as calls;
    a list that is not all calls stays text."""
    request = ToolRequest(TOOLS, "auto")
    text, calls = request.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert text == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    text, calls = request.parse(
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]'
    )
    assert [c.name for c in calls] == ["add", "get_weather"]
    assert [
        c.name
        for c in ToolRequest(TOOLS, "auto", parallel_tool_calls=False).parse(
            '[{"name": "add", "arguments": {}}, {"name": "add", "arguments": {}}]'
        )[1]
    ] == ["add"]
    assert request.parse('[{"name": "add", "arguments": {}}, {"name": "fly", "arguments": {}}]')[1] == []


#: templates that teach Mistral's and Llama 3.x's call formats (what auto reads them by)
MISTRAL_TEMPLATE = TOOLS_TEMPLATE.replace(
    "<tool_call>{{ c.function.name }}</tool_call>", "[TOOL_CALLS]{{ c.function.name }}"
)
LLAMA3_TEMPLATE = TOOLS_TEMPLATE.replace(
    "<tool_call>{{ c.function.name }}</tool_call>", '{"name": "{{ c.function.name }}", "parameters": {}}'
)


@pytest.mark.parametrize(
    ("template", "parser", "starts"),
    [(MISTRAL_TEMPLATE, "mistral", '[{"name": '), (LLAMA3_TEMPLATE, "llama3_json", '{"name": ')],
)
def test_required_calls_are_written_in_the_templates_own_format(stories_package, tmp_path, template, parser, starts):
    """auto picks the format from the template; required and a named function hold the answer to
    it (a JSON list for Mistral, one object with "parameters" for Llama 3.x), and it parses back."""
    package = with_chat_template(stories_package, tmp_path / "pkg", template)
    with Engine(package, plugins=False) as engine:
        assert engine.tool_format().name == parser
        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            got = engine.chat(
                ASK,
                tools=TOOLS,
                tool_choice=choice,
                parallel_tool_calls=False,  # the tiny model would go on adding calls to a list
                max_new_tokens=120,
                temperature=1.0,
                seed=4,
            )
            raw = engine.decode(got.token_ids)
            assert raw.startswith(starts), raw
            if parser == "llama3_json":
                assert '"parameters": ' in raw and '"arguments"' not in raw
            _valid(got.tool_calls)
            assert got.finish_reason == "tool_calls" and got.text == ""
        # the hermes format may still be named, whatever the template
        got = engine.chat(ASK, tools=TOOLS, tool_choice="required", tool_parser="hermes", max_new_tokens=120, seed=4)
        assert engine.decode(got.token_ids).startswith("<tool_call>")
        _valid(got.tool_calls)
        with pytest.raises(
            InvalidRequestError, match="unknown tool parser 'xml'; registered: hermes, llama3_json, mistral"
        ):
            engine.chat(ASK, tools=TOOLS, tool_parser="xml")


def test_a_plugins_tool_format_constrains_and_streams(stories_package, tmp_path):
    """A tool format from a plugin (other tags) holds required calls to its blocks, and the server
    streams its calls as they form."""
    import nextoken
    from nextoken.toolcalls import ToolFormat

    class FunctionTags:
        @nextoken.hookimpl
        def register_tool_parsers(self, register):
            register("fn_tags", lambda options: ToolFormat("fn_tags", "<function>", "</function>"))

    package = with_chat_template(stories_package, tmp_path / "pkg", TOOLS_TEMPLATE)
    with Engine(package, plugins=False, extra_plugins=[FunctionTags()]) as engine:
        got = engine.chat(ASK, tools=TOOLS, tool_choice="required", tool_parser="fn_tags", max_new_tokens=120, seed=4)
        assert engine.decode(got.token_ids).startswith("<function>{")
        _valid(got.tool_calls)
        request = ToolRequest(TOOLS, "auto", format=engine.tool_format("fn_tags"))
        answer = 'Sure. <function>{"name": "add", "arguments": {"a": 1, "b": 22}}</function>'
        stream = CallStream(request)
        pieces = [p for ch in answer for p in stream.feed(ch)] + stream.flush()
        assert [p[0] for p in pieces].count("arguments") > 5  # streamed a fragment at a time
        assert [(c.name, json.loads(c.arguments)) for c in stream.calls] == [("add", {"a": 1, "b": 22})]
        assert stream.text.strip() == "Sure."
    with pytest.raises(InvalidRequestError, match="give both tags, or neither"):
        ToolFormat("half", "<a>")


def test_the_server_takes_the_tool_parser_by_request(stories_package, tmp_path):
    package = with_chat_template(stories_package, tmp_path / "pkg", MISTRAL_TEMPLATE)
    with serving(package, "tools") as (client, _engine, _scheduler, _url):
        ask = dict(
            model="tools", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120
        )
        got = client.chat.completions.create(seed=4, **ask)
        _valid_openai = got.choices[0].message.tool_calls
        assert _valid_openai and got.choices[0].finish_reason == "tool_calls"
        chunks = list(client.chat.completions.create(seed=4, stream=True, **ask))
        streamed = [d.function for c in chunks for d in (c.choices[0].delta.tool_calls or []) if c.choices]
        assert streamed[0].name == _valid_openai[0].function.name
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="tools", messages=ASK, tools=TOOLS, extra_body={"nextoken": {"tool_parser": "xml"}}, max_tokens=4
            )
        assert err.value.body["param"] == "nextoken.tool_parser"
