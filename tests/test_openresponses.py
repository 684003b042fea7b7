"""The openresponses compliance suite's test cases (``src/lib/compliance-tests.ts`` in
openresponses/openresponses, which ``scripts/compliance-test.ts`` runs with bun against a base URL),
ported: each case's request body sent as it is, the response checked against the openai client's
own Responses types (the suite checks its zod schema of the same resource), then the suite's
validators. Adapted, and said so where:

- ``temperature: 0`` is added to every body (the suite's bodies sample; a test must not be flaky),
  and the story model is stopped at its first full stop (``nextoken.stop_token_ids``: greedy, it
  would go round a loop until the window is full, and the suite wants an answer that ends);
- the tool-calling cases ask ``tool_choice: required`` (the suite expects a call under ``auto``,
  which a 260K-parameter story model does not make), and their tool's parameters say
  ``additionalProperties: false`` (OpenAI's strict mode; without it the greedy story model adds
  made-up properties until the window is full);
- image input, which a text server does not take, is a 400 naming it (the issue leaves it out)."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from helpers import TEMPLATE, serving, with_chat_template

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        },
        "required": ["location"],
        "additionalProperties": False,  # adapted: see the module's docstring
    },
}
#: stories260k's "." token
FULL_STOP = 426
ASK_WEATHER = [{"type": "message", "role": "user", "content": "What's the weather like in San Francisco?"}]

#: (id, body, streaming, validators) as the suite has them
CASES = [
    (
        "basic-response",
        {"input": [{"type": "message", "role": "user", "content": "Say hello in exactly 3 words."}]},
        False,
        ("has_output", "completed"),
    ),
    (
        "streaming-response",
        {"input": [{"type": "message", "role": "user", "content": "Count from 1 to 5."}]},
        True,
        ("streaming_events", "completed"),
    ),
    (
        "system-prompt",
        {
            "input": [
                {"type": "message", "role": "system", "content": "You are a pirate. Always respond in pirate speak."},
                {"type": "message", "role": "user", "content": "Say hello."},
            ]
        },
        False,
        ("has_output", "completed"),
    ),
    (
        "tool-calling",
        {"input": ASK_WEATHER, "tools": [WEATHER_TOOL], "tool_choice": "required"},
        False,
        ("has_output", "function_call"),
    ),
    (
        "tool-calling-streaming",
        {"input": ASK_WEATHER, "tools": [WEATHER_TOOL], "tool_choice": "required"},
        True,
        ("streaming_events", "function_call_events"),
    ),
    (
        "multi-turn",
        {
            "input": [
                {"type": "message", "role": "user", "content": "My name is Alice."},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": "Hello Alice! Nice to meet you. How can I help you today?",
                },
                {"type": "message", "role": "user", "content": "What is my name?"},
            ]
        },
        False,
        ("has_output", "completed"),
    ),
]

#: a template that takes tools (the suite's tool cases need one), else the helpers' plain one
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}<tool_call>\n{% endif %}"
    + TEMPLATE
)


@pytest.fixture(scope="module")
def base(stories_package, tmp_path_factory):
    pkg = with_chat_template(stories_package, tmp_path_factory.mktemp("openresponses") / "pkg", TOOLS_TEMPLATE)
    with serving(pkg, "stories", api_key="test-key") as (_client, _engine, _scheduler, url):
        yield url


def _post(base: str, body: dict, stream: bool) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/responses",
        json={**body, "stream": stream},
        headers={"Authorization": "Bearer test-key"},
        timeout=120,
    )


def _events(text: str) -> list[dict]:
    """The SSE stream's events, as the suite's parser reads them (``data:`` lines of JSON)."""
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line[6:] != "[DONE]"]


@pytest.mark.parametrize(("case", "body", "streaming", "checks"), CASES, ids=[c[0] for c in CASES])
def test_openresponses_compliance_case(base, case, body, streaming, checks):
    adapted: dict = {"model": "stories", "temperature": 0}
    if "tools" not in body:  # a call ends where its grammar does
        adapted["nextoken"] = {"stop_token_ids": [FULL_STOP]}
    r = _post(base, {**adapted, **body}, streaming)
    assert r.status_code == 200, r.text
    events: list[dict] = []
    if streaming:
        events = _events(r.text)
        adapter = TypeAdapter(ResponseStreamEvent)
        for event in events:
            adapter.validate_python(event)  # every event in the client's own types
        final = next(e["response"] for e in reversed(events) if e["type"].startswith("response.") and "response" in e)
    else:
        final = r.json()
    response = Response.model_validate(final)  # the resource's schema
    errors = []
    if "has_output" in checks and not response.output:
        errors.append("Response has no output items")
    if "completed" in checks and response.status != "completed":
        errors.append(f'Expected status "completed" but got "{response.status}"')
    if "function_call" in checks and not any(item.type == "function_call" for item in response.output):
        errors.append('Expected output item of type "function_call" but none found')
    if "streaming_events" in checks and not events:
        errors.append("No streaming events received")
    if "function_call_events" in checks:
        kinds = [e["type"] for e in events]
        if not any(e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call" for e in events):
            errors.append("Missing response.output_item.added event with function_call item")
        for kind in ("response.function_call_arguments.delta", "response.function_call_arguments.done"):
            if kind not in kinds:
                errors.append(f"Missing {kind} event")
        if not any(e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call" for e in events):
            errors.append("Missing response.output_item.done event with function_call item")
    assert not errors, (case, errors, final)


def test_openresponses_image_input_is_a_400_naming_it(base):
    body = {
        "model": "stories",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What do you see in this image? Answer in one sentence."},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                ],
            }
        ],
    }
    r = _post(base, body, False)
    assert r.status_code == 400 and "input_image" in r.json()["error"]["message"], r.text
