"""Anthropic's Messages API, driven with the official anthropic client: system and content blocks
through the chat template, stop sequences, streaming with Anthropic's events, count_tokens, tools
(tool_use and tool_result blocks), thinking blocks, and errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import jsonschema
import pytest
from anthropic.types import Message
from test_toolcalls import SCHEMAS, TOOLS, TOOLS_TEMPLATE

from helpers import ANSWER, TEMPLATE, THOUGHT, serving, thinking_server, with_chat_template

KEY = "test-key"


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    pkg = with_chat_template(tiny_llama[1], tmp_path_factory.mktemp("msg") / "tiny", TEMPLATE)
    with serving(pkg, "tiny", api_key=KEY) as (openai_client, engine, _scheduler, base):
        client = anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0, timeout=60)
        yield client, openai_client, engine


def test_a_message_is_the_chat_answer_in_anthropics_shape(served):
    client, openai_client, _ = served
    got = client.messages.create(
        model="tiny",
        max_tokens=8,
        extra_body={"temperature": 0},
        system="Tell tales.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}],
    )
    Message.model_validate(got.model_dump())
    chat = openai_client.chat.completions.create(
        model="tiny",
        max_tokens=8,
        extra_body={"temperature": 0},
        messages=[{"role": "system", "content": "Tell tales."}, {"role": "user", "content": "Once upon a time"}],
    )
    assert got.content[0].type == "text" and got.content[0].text == chat.choices[0].message.content
    assert got.stop_reason == "max_tokens" and got.usage.output_tokens == 8
    assert got.usage.input_tokens == chat.usage.prompt_tokens
    counted = client.messages.count_tokens(
        model="tiny", system="Tell tales.", messages=[{"role": "user", "content": "Once upon a time"}]
    )
    assert counted.input_tokens == got.usage.input_tokens


def test_stop_sequences_and_the_streamed_events(served):
    client, *_ = served
    messages = [{"role": "user", "content": "Once upon a time"}]
    plain = client.messages.create(model="tiny", max_tokens=12, extra_body={"temperature": 0}, messages=messages)
    text = plain.content[0].text
    stop = text.strip()[2:4]  # something the answer says
    cut = client.messages.create(
        model="tiny", max_tokens=12, extra_body={"temperature": 0}, messages=messages, stop_sequences=[stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop and stop not in cut.content[0].text
    with client.messages.stream(
        model="tiny", max_tokens=12, extra_body={"temperature": 0}, messages=messages
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    assert final.content[0].text == text and final.stop_reason == "max_tokens"


def test_errors_in_anthropics_shape(served):
    client, *_ = served
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="tiny",
            max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "AA=="}}]}],
        )
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    assert "not supported" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="other", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=client.base_url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )


def test_tools_tool_use_and_tool_result(stories_package, tmp_path):
    pkg = with_chat_template(stories_package, tmp_path / "tools", TOOLS_TEMPLATE)
    tools = [
        {
            "name": t["function"]["name"],
            "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"],
        }
        for t in TOOLS
    ]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with serving(pkg, "tools") as (_, _engine, _scheduler, base):
        client = anthropic.Anthropic(base_url=base, api_key="none", max_retries=0, timeout=60)
        got = client.messages.create(
            model="tools",
            max_tokens=120,
            tools=tools,
            tool_choice={"type": "any"},
            messages=ask,
            extra_body={"temperature": 1.0},
        )
        uses = [b for b in got.content if b.type == "tool_use"]
        assert got.stop_reason == "tool_use" and uses
        for use in uses:
            jsonschema.validate(use.input, SCHEMAS[use.name])
        with client.messages.stream(
            model="tools", max_tokens=120, tools=tools, tool_choice={"type": "any"}, messages=ask
        ) as stream:
            kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use" and any(b.type == "tool_use" for b in final.content)
        assert kinds.count(("content_block_delta", "input_json_delta")) > 1  # the input as it forms
        for use in (b for b in final.content if b.type == "tool_use"):
            jsonschema.validate(use.input, SCHEMAS[use.name])
        answered = client.messages.create(
            model="tools",
            max_tokens=10,
            tools=tools,
            messages=ask
            + [
                {"role": "assistant", "content": [b.model_dump() for b in got.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 C"}]},
            ],
        )
        assert answered.content[-1].type in ("text", "tool_use")


def test_thinking_blocks(stories_package, tmp_path):
    body = dict(
        model="thinker",
        max_tokens=60,
        messages=[{"role": "user", "content": "Hi"}],
        extra_body={"nextoken": {"processors": ["force"]}},
    )
    with thinking_server(stories_package, tmp_path / "thinker") as (_, _engine, _scheduler, base):
        client = anthropic.Anthropic(base_url=base, api_key="none", max_retries=0, timeout=60)
        got = client.messages.create(**body)
        assert [b.type for b in got.content] == ["thinking", "text"]
        assert (got.content[0].thinking, got.content[1].text) == (THOUGHT, ANSWER)
        with client.messages.stream(**body) as stream:
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["thinking", "text"]
        assert (final.content[0].thinking, final.content[1].text) == (THOUGHT, ANSWER)
