"""The ``openai`` SDK's chat routed to Anthropic, Gemini and Azure OpenAI channels of the fake upstream
through the whole stack: content, tool calls, stop reasons, and the exact charge of the provider's
usage (cached input, cache writes and reasoning tokens each at their own price)."""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from services import admin_client
from tests.e2e.stack import Deployment, fund_user, ok, settled_balance

pytestmark = pytest.mark.shared_stack

KEY = "provider-test-key"
SYSTEM = "be brief"  # 2 words
QUESTION = "what is the weather"  # 4 words
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
# The fake's call of WEATHER (tokens.tool_arguments): 1 token for the name plus 1 per argument.
ARGUMENTS = {"city": "tok0", "days": 1}
TOOL_TOKENS = 3
CACHED, CACHE_WRITE, REASONING = 2, 3, 5
PRICE = {
    "input_per_mtok": 3_000_000,
    "cached_input_per_mtok": 300_000,
    "cache_write_per_mtok": 3_750_000,
    "output_per_mtok": 15_000_000,
    "reasoning_per_mtok": 20_000_000,
    "default_max_output_tokens": 64,
}


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
IMAGE_CAP = 64 * 1024


@dataclass(frozen=True)
class Kind:
    """A channel type, and the usage the fake reports for the test's prompt."""

    model: str
    channel: dict[str, Any]
    # Tokens of the prompt as the record keeps them: (prompt, cached, cache writes).
    prompt: tuple[int, int, int]


def kinds(upstream_url: str) -> list[Kind]:
    return [
        Kind(
            "claude-e2e",
            {"type": "anthropic", "base_url": f"{upstream_url}/v1"},
            # 7 prompt tokens: 2 read from the cache, 3 written to it (outside the prompt count), 2 plain.
            (4, CACHED, CACHE_WRITE),
        ),
        Kind("gemini-e2e", {"type": "gemini", "base_url": f"{upstream_url}/v1beta"}, (7, CACHED, 0)),
        Kind(
            "azure-e2e",
            {
                "type": "azure-openai",
                "base_url": upstream_url,
                "api_version": "2024-10-21",
                "model_map": {"azure-e2e": "gpt-deployment"},
            },
            # OpenAI's rule: 1 per message plus the words.
            (8, CACHED, 0),
        ),
    ]


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    # Exact reservations: each request's charge is settled alone, so the balance shows it. Image URLs
    # are fetched from the test's own server on 127.0.0.1 (over http: the relay has no test CA).
    return {
        "RELAYGATE_CREDIT_LEASES": "false",
        "RELAYGATE_FETCH_ALLOW_HOSTS": "127.0.0.1",
        "RELAYGATE_FETCH_ALLOW_HTTP": "true",
        "RELAYGATE_FETCH_MAX_BYTES": str(IMAGE_CAP),
    }


@pytest.fixture(scope="module")
def channels(deployment: Deployment) -> list[Kind]:
    found = kinds(deployment.upstream.url)
    with deployment.admin() as admin:
        for kind in found:
            ok(
                admin.post(
                    "/admin/v1/channels",
                    json={
                        "name": kind.model,
                        "api_key": KEY,
                        "models": [kind.model],
                        "enabled": True,
                        **kind.channel,
                    },
                )
            )
            ok(admin.put(f"/admin/v1/prices/{kind.model}", json=PRICE))
    return found


@pytest.fixture(autouse=True)
def _upstream(deployment: Deployment) -> Iterator[None]:
    deployment.upstream.reset()
    deployment.upstream.configure(
        chunks=4,
        cached_tokens=CACHED,
        cache_write_tokens=CACHE_WRITE,
        reasoning_tokens=REASONING,
        api_key=KEY,
    )
    yield


def expected_charge(kind: Kind, completion: int) -> int:
    prompt, cached, written = kind.prompt
    micros = (
        (prompt - cached) * PRICE["input_per_mtok"]
        + cached * PRICE["cached_input_per_mtok"]
        + written * PRICE["cache_write_per_mtok"]
        + (completion - REASONING) * PRICE["output_per_mtok"]
        + REASONING * PRICE["reasoning_per_mtok"]
    )
    return math.ceil(micros / 1_000_000)


def messages() -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


def logged(deployment: Deployment, user_id: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The user's request-log rows, newest first, once the logger wrote ``count`` of them."""
    deadline = time.monotonic() + timeout
    with deployment.admin() as admin:
        while True:
            rows: list[dict[str, Any]] = ok(admin.get("/admin/v1/logs", params={"user_id": user_id}))["logs"]
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


def charged(deployment: Deployment, user_id: str, funded: int) -> int:
    after = settled_balance(deployment, user_id)
    assert after["reserved_micros"] == 0
    return funded - after["balance_micros"]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["anthropic", "gemini", "azure-openai"])
def test_chat_answer_and_stream(deployment: Deployment, channels: list[Kind], index: int) -> None:
    kind = channels[index]
    funded = 10_000_000
    user_id, key = fund_user(deployment, funded)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)

    answer = client.chat.completions.create(model=kind.model, messages=messages(), max_tokens=3)
    assert (answer.choices[0].message.content or "").split() == ["tok0", "tok1", "tok2"]
    assert answer.choices[0].finish_reason == "length"
    usage = answer.usage
    assert usage is not None
    prompt, cached, written = kind.prompt
    assert usage.prompt_tokens == prompt + written
    assert usage.completion_tokens == 3 + REASONING
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == cached
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == REASONING
    assert charged(deployment, user_id, funded) == expected_charge(kind, 3 + REASONING)

    funded -= expected_charge(kind, 3 + REASONING)
    chunks = list(
        client.chat.completions.create(
            model=kind.model,
            messages=messages(),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["tok0", "tok1", "tok2", "tok3"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4 + REASONING
    assert charged(deployment, user_id, funded) == expected_charge(kind, 4 + REASONING)

    # The request log keeps every token kind the charge was computed from.
    streamed, answered = logged(deployment, user_id, 2)
    for row, completion in ((answered, 3 + REASONING), (streamed, 4 + REASONING)):
        recorded = {name: int(value) for name, value in row["usage"].items() if name != "estimated"}
        assert recorded == {
            "prompt_tokens": prompt,
            "cached_prompt_tokens": cached,
            "cache_write_tokens": written,
            "completion_tokens": completion,
            "reasoning_tokens": REASONING,
            "images": 0,
        }
        assert int(row["cost_micros"]) == expected_charge(kind, completion)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["anthropic", "gemini", "azure-openai"])
def test_tool_calls_answer_and_stream(deployment: Deployment, channels: list[Kind], index: int) -> None:
    kind = channels[index]
    funded = 10_000_000
    user_id, key = fund_user(deployment, funded)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)
    request: dict[str, Any] = {
        "model": kind.model,
        "messages": messages(),
        "tools": [WEATHER],
        "tool_choice": "required",
    }

    answer = client.chat.completions.create(**request)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "weather" and call.id
    assert json.loads(call.function.arguments) == ARGUMENTS
    completion = 4 + TOOL_TOKENS + REASONING
    assert answer.usage is not None and answer.usage.completion_tokens == completion
    spent = expected_charge(kind, completion)
    assert charged(deployment, user_id, funded) == spent

    funded -= spent
    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tool for delta in deltas for tool in delta.tool_calls or []]
    assert calls[0].id and calls[0].function is not None and calls[0].function.name == "weather"
    assert {tool.index for tool in calls} == {0}
    arguments = "".join((tool.function.arguments or "") for tool in calls if tool.function is not None)
    assert json.loads(arguments) == ARGUMENTS
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    # The caller did not ask for the usage chunk: none is sent, the charge is still exact.
    assert all(c.choices for c in chunks)
    assert charged(deployment, user_id, funded) == spent


def test_embeddings_are_refused_for_a_converted_channel_type(
    deployment: Deployment, channels: list[Kind]
) -> None:
    _, key = fund_user(deployment, 1_000_000)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError, match="chat completions"):
        client.embeddings.create(model=channels[0].model, input="hello")
    # Azure serves embeddings as OpenAI does, under its deployment path.
    assert len(client.embeddings.create(model=channels[2].model, input="hello").data) == 1
    assert deployment.upstream.stats()["requests_total"] == 1


def test_a_provider_error_reaches_the_caller_in_openai_shape(
    deployment: Deployment, channels: list[Kind]
) -> None:
    _, key = fund_user(deployment, 1_000_000)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)
    deployment.upstream.configure(fail_status=400, fail_count=1)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=channels[0].model, messages=messages())
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"


def _admin(deployment: Deployment, *argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    admin_client.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["admin", *argv])
    with admin_client.AdminClient(deployment.relay_url, deployment.admin_key) as client:
        return admin_client.run_command(client, args)


def test_the_command_line_sets_channel_types_and_price_kinds(deployment: Deployment) -> None:
    added = _admin(
        deployment,
        *("channels", "add", "--name", "cli-azure", "--type", "azure-openai", "--api-version", "2024-10-21"),
        *("--base-url", deployment.upstream.url, "--models", "cli-model", "--api-key", "secret-azure-key"),
        *("--model-map", "cli-model=cli-deployment"),
    )
    assert (added["type"], added["api_version"], added["model_map"]) == (
        "azure-openai",
        "2024-10-21",
        {"cli-model": "cli-deployment"},
    )
    updated = _admin(
        deployment,
        *("channels", "update", added["channel_id"], "--type", "anthropic", "--api-version", ""),
        *("--base-url", f"{deployment.upstream.url}/v1"),
    )
    # Only what was given changed; the (masked) key was kept without being sent again.
    assert (updated["type"], updated["name"], updated["models"]) == ("anthropic", "cli-azure", ["cli-model"])
    assert updated["api_key"] == added["api_key"] != "secret-azure-key"
    _admin(deployment, "channels", "delete", added["channel_id"])

    price = _admin(
        deployment,
        *(
            "prices",
            "set",
            "cli-model",
            "--input",
            "3",
            "--output",
            "15",
            "--cache-write",
            "4",
            "--reasoning",
            "20",
        ),
    )
    assert (price["cache_write_per_mtok"], price["reasoning_per_mtok"]) == ("4", "20")


# Thinking within the cap the request is held for: Anthropic wants the budget (1024 for "low") under it.
THINKING_CAP = 2000
THOUGHTS = "".join(f"thought{n} " for n in range(REASONING))


def charge_of(usage: CompletionUsage) -> int:
    """The charge for the usage a caller was answered with, at PRICE."""
    prompt_details, completion_details = usage.prompt_tokens_details, usage.completion_tokens_details
    assert prompt_details is not None and completion_details is not None
    cached, written = prompt_details.cached_tokens or 0, prompt_details.cache_write_tokens or 0
    reasoning = completion_details.reasoning_tokens or 0
    micros = (
        (usage.prompt_tokens - written - cached) * PRICE["input_per_mtok"]
        + cached * PRICE["cached_input_per_mtok"]
        + written * PRICE["cache_write_per_mtok"]
        + (usage.completion_tokens - reasoning) * PRICE["output_per_mtok"]
        + reasoning * PRICE["reasoning_per_mtok"]
    )
    return math.ceil(micros / 1_000_000)


def extra_of(model: Any) -> dict[str, Any]:
    """The fields of an SDK object its types do not declare (the chat extensions)."""
    extra: dict[str, Any] = model.model_extra or {}
    return extra


@pytest.mark.parametrize("index", [0, 1], ids=["anthropic", "gemini"])
def test_reasoning_effort_returns_reasoning_content(
    deployment: Deployment, channels: list[Kind], index: int
) -> None:
    kind = channels[index]
    funded = 10_000_000
    user_id, key = fund_user(deployment, funded)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)
    request: dict[str, Any] = {
        "model": kind.model,
        "messages": messages(),
        "reasoning_effort": "low",
        "max_tokens": THINKING_CAP,
    }

    answer = client.chat.completions.create(**request)
    message = answer.choices[0].message
    assert (message.content or "").split() == ["tok0", "tok1", "tok2", "tok3"]
    assert extra_of(message)["reasoning_content"] == THOUGHTS
    if kind.channel["type"] == "anthropic":
        [block] = extra_of(message)["thinking_blocks"]
        assert block["type"] == "thinking" and block["thinking"] == THOUGHTS and block["signature"]
    assert answer.usage is not None and answer.usage.completion_tokens == 4 + REASONING
    assert charged(deployment, user_id, funded) == expected_charge(kind, 4 + REASONING)

    funded -= expected_charge(kind, 4 + REASONING)
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    deltas = [
        extra_of(c.choices[0].delta) | {"content": c.choices[0].delta.content} for c in chunks if c.choices
    ]
    reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    # One delta per thinking word, as the provider streamed them, all before the answer's text.
    assert reasoning == [f"thought{n} " for n in range(REASONING)]
    first_text = next(n for n, d in enumerate(deltas) if d["content"])
    assert all(not d.get("reasoning_content") for d in deltas[first_text:])
    assert "".join(d["content"] or "" for d in deltas).split() == ["tok0", "tok1", "tok2", "tok3"]
    signed = [block for d in deltas for block in d.get("thinking_blocks") or ()]
    if kind.channel["type"] == "anthropic":
        assert [block["signature"] for block in signed] == [
            extra_of(message)["thinking_blocks"][0]["signature"]
        ]
    else:
        assert signed == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4 + REASONING
    assert charged(deployment, user_id, funded) == expected_charge(kind, 4 + REASONING)


def test_anthropic_tool_turn_with_thinking_blocks(deployment: Deployment, channels: list[Kind]) -> None:
    kind = channels[0]
    funded = 10_000_000
    user_id, key = fund_user(deployment, funded)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)
    deployment.upstream.configure(tool_call=True)
    request: dict[str, Any] = {
        "model": kind.model,
        "tools": [WEATHER],
        "reasoning_effort": "low",
        "max_tokens": THINKING_CAP,
    }
    # Anthropic refuses thinking with a forced tool call; its 400 reaches the caller and costs nothing.
    with pytest.raises(openai.BadRequestError, match="forces tool use"):
        client.chat.completions.create(**request, messages=messages(), tool_choice="required")

    first = client.chat.completions.create(**request, messages=messages())
    message = first.choices[0].message
    [call] = message.tool_calls or []
    blocks = extra_of(message)["thinking_blocks"]
    assert first.choices[0].finish_reason == "tool_calls" and blocks[0]["signature"]
    spent = charge_of(first.usage) if first.usage is not None else -1
    assert spent == expected_charge(kind, 4 + TOOL_TOKENS + REASONING)

    def continued(thinking_blocks: list[dict[str, Any]] | None) -> ChatCompletion:
        assistant: dict[str, Any] = message.model_dump(
            exclude_none=True, include={"role", "content", "tool_calls"}
        )
        if thinking_blocks is not None:
            assistant["thinking_blocks"] = thinking_blocks
        turn: list[Any] = [
            *messages(),
            assistant,
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ]
        answer: ChatCompletion = client.chat.completions.create(**request, messages=turn)
        return answer

    # Anthropic requires the turn's signed thinking block back; without it, or unsigned, it refuses.
    with pytest.raises(openai.BadRequestError, match="must start with a thinking block"):
        continued(None)
    with pytest.raises(openai.BadRequestError, match="signature"):
        continued([{key: value for key, value in blocks[0].items() if key != "signature"}])
    second = continued(blocks)
    assert (
        second.choices[0].message.tool_calls
        and extra_of(second.choices[0].message)["reasoning_content"] == THOUGHTS
    )
    assert second.usage is not None
    spent += charge_of(second.usage)
    # Two requests billed, at each token kind's price; the three refused ones cost nothing.
    assert charged(deployment, user_id, funded) == spent


def test_gemini_tool_turn_keeps_its_thought_signature(deployment: Deployment, channels: list[Kind]) -> None:
    kind = channels[1]
    _, key = fund_user(deployment, 10_000_000)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)
    deployment.upstream.configure(tool_call=True)
    request: dict[str, Any] = {"model": kind.model, "tools": [WEATHER], "reasoning_effort": "low"}
    first = client.chat.completions.create(**request, messages=messages())
    [call] = first.choices[0].message.tool_calls or []
    assert "__thought__" in call.id
    again = client.chat.completions.create(**request, messages=messages())
    assert (again.choices[0].message.tool_calls or [])[0].id != call.id

    def continued(call_id: str) -> ChatCompletion:
        sent = call.model_dump() | {"id": call_id}
        turn: list[Any] = [
            *messages(),
            {"role": "assistant", "content": None, "tool_calls": [sent]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
        ]
        answer: ChatCompletion = client.chat.completions.create(**request, messages=turn)
        return answer

    assert continued(call.id).choices[0].message.tool_calls
    # Gemini 3 refuses the current turn's function call without its signature.
    with pytest.raises(openai.BadRequestError, match="thought_signature"):
        continued(call.id.partition("__thought__")[0])


class _Images(http.server.BaseHTTPRequestHandler):
    """The images the e2e requests point at: one PNG, one too large, a page, and a redirect to a
    private address."""

    ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
        "/cat.png": (200, {"Content-Type": "image/png"}, PNG),
        "/big.png": (200, {"Content-Type": "image/png"}, bytes(IMAGE_CAP + 1)),
        "/page": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/metadata": (302, {"Location": "http://10.0.0.1/latest/meta-data/"}, b""),
    }

    def do_GET(self) -> None:
        status, headers, body = self.ROUTES.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _with_image(url: str) -> list[ChatCompletionMessageParam]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": QUESTION},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def test_gemini_image_urls_are_fetched_and_sent_inline(
    deployment: Deployment, channels: list[Kind], image_server: str
) -> None:
    kind = channels[1]
    funded = 10_000_000
    user_id, key = fund_user(deployment, funded)
    client = openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)

    answer = client.chat.completions.create(
        model=kind.model, messages=_with_image(f"{image_server}/cat.png"), max_tokens=3
    )
    assert answer.choices[0].message.content
    sent = deployment.upstream.stats()["last_request"]
    assert sent is not None
    parts = sent["body"]["contents"][0]["parts"]
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}}
    spent = charged(deployment, user_id, funded)
    assert spent > 0

    # Loopback under another name than the allowed one, too large, not an image, a redirect to a
    # private address: each the caller's 400 naming the part, with nothing sent upstream or charged.
    port = image_server.rpartition(":")[2]
    refusals = {
        f"http://localhost:{port}/cat.png": "loopback address",
        f"{image_server}/big.png": f"larger than {IMAGE_CAP} bytes",
        f"{image_server}/page": "'text/html' is not one of",
        f"{image_server}/metadata": "private address (10.0.0.1)",
    }
    deployment.upstream.reset()
    for url, reason in refusals.items():
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=kind.model, messages=_with_image(url), max_tokens=3)
        message = str(refused.value)
        assert "messages[0].content[1]: the image URL cannot be used" in message and reason in message, (
            message
        )
    assert deployment.upstream.stats()["requests_total"] == 0
    assert charged(deployment, user_id, funded) == spent
