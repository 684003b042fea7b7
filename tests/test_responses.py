"""OpenAI's Responses API, driven with the official openai client: input items and instructions
through the chat template, the event sequence when streamed, the store and previous_response_id,
text.format, function tools and their outputs, a reasoning item, and clear 400s for what a text
server does not take (images, non-function tools). Every body is checked against the client's own
types."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response
from test_toolcalls import SCHEMAS, TOOLS, TOOLS_TEMPLATE

from helpers import ANSWER, TEMPLATE, THOUGHT, serving, thinking_server, with_chat_template

GREEDY = dict(temperature=0, max_output_tokens=8)


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    pkg = with_chat_template(tiny_llama[1], tmp_path_factory.mktemp("resp") / "tiny", TEMPLATE)
    with serving(pkg, "tiny") as (client, engine, _scheduler, base):
        yield client, engine, base


def _raw(base: str, body: dict) -> dict:
    r = httpx.post(f"{base}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    Response.model_validate(r.json())  # the client's own schema, strictly
    return r.json()


def test_a_response_is_the_chat_answer_in_the_responses_shape(served):
    client, engine, base = served
    got = client.responses.create(model="tiny", input="Once upon a time", **GREEDY)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Once upon a time"}], temperature=0, max_tokens=8
    )
    assert got.output_text == chat.choices[0].message.content
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert (got.usage.input_tokens, got.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
    ]
    raw = _raw(base, {"model": "tiny", "input": items, "instructions": "Tell tales.", **GREEDY})
    messages = [
        {"role": "system", "content": "Tell tales."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert raw["usage"]["input_tokens"] == len(engine.apply_chat_template(messages))
    assert raw["output"][0]["type"] == "message" and raw["instructions"] == "Tell tales."


def test_the_event_sequence_when_streamed(served):
    client, *_ = served
    events = list(client.responses.create(model="tiny", input="Once upon a time", stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and events[-4].text == text
    assert final.output[0].id == events[2].item.id  # the streamed item is the stored one


def test_the_store_continues_a_conversation(served):
    client, engine, _ = served
    first = client.responses.create(model="tiny", input="Hi", **GREEDY)
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id, **GREEDY)
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    assert second.usage.input_tokens == len(engine.apply_chat_template(conversation))
    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    unstored = client.responses.create(model="tiny", input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id=unstored.id, **GREEDY)


def test_what_a_text_server_does_not_take_is_a_400_naming_it(served):
    client, *_ = served
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="tiny", input=image, **GREEDY)
    assert caught.value.body["param"] == "input" and "input_image is not supported" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="tiny", input="Hi", tools=[{"type": "web_search"}], **GREEDY)
    assert caught.value.body["param"] == "tools"


def test_text_format_json_schema_holds(served):
    client, *_ = served
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    got = client.responses.create(
        model="tiny",
        input="A number",
        text={"format": {"type": "json_schema", "name": "number", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=20,
    )
    jsonschema.validate(json.loads(got.output_text), schema)


def test_function_tools_calls_and_their_outputs(stories_package, tmp_path):
    pkg = with_chat_template(stories_package, tmp_path / "tools", TOOLS_TEMPLATE)
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    ask = "What is the weather in Paris?"
    with serving(pkg, "tools") as (client, *_):
        got = client.responses.create(
            model="tools", input=ask, tools=flat, tool_choice="required", max_output_tokens=120, temperature=1.0
        )
        calls = [item for item in got.output if item.type == "function_call"]
        assert calls and all(c.call_id.startswith("call_") for c in calls)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        events = list(
            client.responses.create(
                model="tools", input=ask, tools=flat, tool_choice="required", max_output_tokens=120, stream=True
            )
        )
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
        fragments = [e for e in events if e.type == "response.function_call_arguments.delta"]
        assert done and len(added) == len(done) and len(fragments) > len(done)  # arguments as they form
        assert all(e.item.name in SCHEMAS and e.item.arguments == "" for e in added)
        final = events[-1].response
        assert events[-1].type == "response.completed"
        assert [i.id for i in final.output if i.type == "function_call"] == [e.item_id for e in done]
        for event in done:
            jsonschema.validate(
                json.loads(event.arguments), SCHEMAS[next(a.item.name for a in added if a.item.id == event.item_id)]
            )
        back = client.responses.create(
            model="tools",
            previous_response_id=got.id,
            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, sunny"}],
            tools=flat,
            max_output_tokens=10,
        )
        assert back.status in ("completed", "incomplete") and back.output[-1].type == "message"


def test_a_thinking_model_gives_a_reasoning_item(stories_package, tmp_path):
    body = dict(model="thinker", input="Hi", max_output_tokens=60, extra_body={"nextoken": {"processors": ["force"]}})
    with thinking_server(stories_package, tmp_path / "thinker") as (client, *_):
        got = client.responses.create(**body)
        assert [item.type for item in got.output] == ["reasoning", "message"]
        assert got.output[0].content[0].text == THOUGHT and got.output_text == ANSWER
        assert got.usage.output_tokens_details.reasoning_tokens > 0
        events = list(client.responses.create(stream=True, **body))
        thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        said = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert (thought, said) == (THOUGHT, ANSWER)
        assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
