"""Gemini ``generateContent`` / ``streamGenerateContent?alt=sse`` (``x-goog-api-key``).

Request (https://ai.google.dev/api/generate-content): system and developer messages become
``systemInstruction``; user turns ``user`` contents and assistant turns ``model`` contents (text,
images as ``inlineData`` from base64 data URLs or ``fileData`` from other URLs, the assistant's
``functionCall`` parts); tool messages become ``functionResponse`` parts named after the call they
answer. ``tools`` -> ``functionDeclarations`` (``parametersJsonSchema``), ``tool_choice`` ->
``toolConfig.functionCallingConfig`` (AUTO, NONE, ANY with ``allowedFunctionNames``), the caps,
``temperature``, ``top_p``, ``stop``, ``n`` (``candidateCount``), ``seed``, the presence and
frequency penalties and JSON ``response_format`` -> ``generationConfig``. ``thinking`` /
``reasoning_effort`` -> ``generationConfig.thinkingConfig`` (``thinkingBudget``, ``includeThoughts``;
https://ai.google.dev/gemini-api/docs/thinking, see :mod:`.reasoning`); a ``file`` part (a PDF) ->
``inlineData`` (https://ai.google.dev/gemini-api/docs/document-processing). A tool call id carrying a
``thoughtSignature`` (below) gives its ``functionCall`` part the signature back, which Gemini 3
requires on the function calls of the current turn
(https://ai.google.dev/gemini-api/docs/thought-signatures).

Image URLs: ``fileData.fileUri`` is a URI Google itself reads. On the Gemini Developer API that has
long meant URIs of its Files API (``https://generativelanguage.googleapis.com/v1beta/files/...``, an
upload made with the same key) and YouTube links; since January 2026 it also takes public or signed
https URLs and registered Cloud Storage objects, but not for every model (the 2.0 family is an
exception; https://ai.google.dev/gemini-api/docs/file-input-methods). Vertex AI's ``fileUri`` takes
``gs://`` objects and https URLs. Inline data works for every model on both, so, like LiteLLM and
new-api, the relay downloads the image itself (with its SSRF checks,
:mod:`services.relay.upstream.fetch`) before the request is converted, and the part arrives here as a
data URL (:mod:`services.relay.pipeline.media`); only Files API URIs still reach ``fileData`` as URLs.

Answer and stream: each candidate is a choice; ``functionCall`` parts become ``tool_calls`` (Gemini
sends a call whole, so its arguments arrive as one delta; Gemini gives no call ids, so each gets a
random one, and the part's ``thoughtSignature`` is carried after ``__thought__`` in it, LiteLLM's
way) and turn a ``STOP`` into ``tool_calls``; thought parts (``thought: true``) become
``reasoning_content`` (joined in an answer, a delta each in a stream);
``finishReason`` maps by :data:`~services.relay.providers.content.GEMINI_FINISH`. Usage:
``promptTokenCount`` (cached part ``cachedContentTokenCount``) is the prompt, ``candidatesTokenCount``
plus ``thoughtsTokenCount`` the completion, the thoughts its reasoning part. A stream has no end
marker of its own: it is complete when a finish reason came before the body ended.
"""

from __future__ import annotations

import secrets
import urllib.parse
from typing import Any

import orjson

from services.common.errors import UpstreamError
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.relay.providers.base import (
    DONE,
    ChunkWriter,
    Provider,
    completion,
    count,
    error_body,
    invalid,
    loads_object,
    tool_call_delta,
)
from services.relay.providers.content import (
    GEMINI_FINISH,
    arguments_of,
    chosen_function,
    parse_data_url,
    text_of,
)
from services.relay.providers.events import EventReader
from services.relay.providers.reasoning import THOUGHT_SEPARATOR, file_data, gemini_thinking, split_call_id

__all__ = ["GEMINI", "GeminiProvider"]

_ROLES = {"user": "user", "assistant": "model", "tool": "user"}


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise invalid("A message's content must be a string or a list of parts.", "messages")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise invalid("An image_url part needs a url.", "messages")
            data = parse_data_url(url)
            if data is None:
                parts.append({"fileData": {"mimeType": _guess_type(url), "fileUri": url}})
            else:
                parts.append({"inlineData": {"mimeType": data[0], "data": data[1]}})
        elif kind == "file":
            media_type, encoded, _ = file_data(part)
            parts.append({"inlineData": {"mimeType": media_type, "data": encoded}})
        else:
            raise invalid(f"Content parts of type {kind!r} cannot be sent to a Gemini channel.", "messages")
    return parts


def _guess_type(url: str) -> str:
    path = urllib.parse.urlsplit(url).path.lower()
    for suffix, media_type in ((".png", "image/png"), (".gif", "image/gif"), (".webp", "image/webp")):
        if path.endswith(suffix):
            return media_type
    return "image/jpeg"


def _contents(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system parts, contents) of an OpenAI chat body."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the responses
    for message in body.get("messages") or ():
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.extend(_parts(message.get("content")))
            continue
        if role not in _ROLES:
            raise invalid(f"Messages of role {role!r} cannot be sent to a Gemini channel.", "messages")
        if role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            response = {
                "name": names.get(call_id, call_id),
                "response": {"content": text_of(message.get("content"))},
            }
            parts: list[dict[str, Any]] = [{"functionResponse": response}]
        else:
            parts = _parts(message.get("content"))
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    call_id = str(call.get("id") or "")
                    names[call_id] = str(function.get("name") or "")
                    called: dict[str, Any] = {
                        "functionCall": {"name": function.get("name") or "", "args": arguments_of(call)}
                    }
                    signature = split_call_id(call_id)[1]
                    if signature is not None:
                        called["thoughtSignature"] = signature
                    parts.append(called)
        as_role = _ROLES[role]
        if contents and contents[-1]["role"] == as_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": as_role, "parts": parts})
    return system, contents


def _generation_config(body: dict[str, Any], max_output_tokens: int) -> dict[str, Any]:
    config: dict[str, Any] = {}
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or max_output_tokens
    if cap:
        config["maxOutputTokens"] = cap
    for source, name in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("n", "candidateCount"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        value = body.get(source)
        if isinstance(value, int | float) and not isinstance(value, bool):
            config[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        config["stopSequences"] = stop
    thinking = gemini_thinking(body)
    if thinking is not None:
        config["thinkingConfig"] = thinking
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = response_format.get("json_schema")
        if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            config["responseJsonSchema"] = schema["schema"]
    return config


def _tools(body: dict[str, Any], request: dict[str, Any]) -> None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return
    declarations = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid("Each tool needs a function with a name.", "tools")
        declaration: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            declaration["description"] = function["description"]
        if function.get("parameters"):
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    request["tools"] = [{"functionDeclarations": declarations}]
    choice = body.get("tool_choice")
    calling: dict[str, Any] | None = None
    if choice == "none":
        calling = {"mode": "NONE"}
    elif choice == "required":
        calling = {"mode": "ANY"}
    elif choice == "auto":
        calling = {"mode": "AUTO"}
    elif isinstance(choice, dict):
        calling = {"mode": "ANY", "allowedFunctionNames": [chosen_function(choice)]}
    if calling is not None:
        request["toolConfig"] = {"functionCallingConfig": calling}


def _usage(report: Any) -> Usage | None:
    if not isinstance(report, dict):
        return None
    prompt = count(report.get("promptTokenCount"))
    thoughts = count(report.get("thoughtsTokenCount"))
    return Usage(
        prompt_tokens=prompt,
        cached_prompt_tokens=min(count(report.get("cachedContentTokenCount")), prompt),
        completion_tokens=count(report.get("candidatesTokenCount")) + thoughts,
        reasoning_tokens=thoughts,
    )


def _call_id(call: dict[str, Any], part: dict[str, Any]) -> str:
    """The OpenAI id of a function call: Gemini's when it gives one (it mostly does not), else a
    fresh one, unique across requests; the part's ``thoughtSignature`` rides after it."""
    call_id = str(call.get("id") or f"call_{secrets.token_hex(12)}")
    signature = part.get("thoughtSignature")
    return call_id + THOUGHT_SEPARATOR + signature if isinstance(signature, str) and signature else call_id


def _finish(reason: Any, called: bool) -> str:
    finish = GEMINI_FINISH.get(str(reason), "stop")
    return "tool_calls" if called and finish == "stop" else finish


class GeminiProvider(Provider):
    kind = "gemini"
    # fileData.fileUri takes Google's own URIs (the module docstring says which).
    inline_images = True

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def target(self, prefix: bytes, path: bytes, model: str, *, stream: bool, api_version: str) -> bytes:
        name = urllib.parse.quote(model.removeprefix("models/"), safe="-._~@").encode()
        if stream:
            return prefix + b"/models/" + name + b":streamGenerateContent?alt=sse"
        return prefix + b"/models/" + name + b":generateContent"

    def request(self, body: dict[str, Any], model: str, *, stream: bool, max_output_tokens: int) -> bytes:
        system, contents = _contents(body)
        if not contents:
            raise invalid("A Gemini channel needs at least one user or assistant message.", "messages")
        request: dict[str, Any] = {"contents": contents}
        if system:
            request["systemInstruction"] = {"parts": system}
        config = _generation_config(body, max_output_tokens)
        if config:
            request["generationConfig"] = config
        _tools(body, request)
        return orjson.dumps(request)

    def answer(self, body: bytes, model: str) -> tuple[bytes, Usage | None]:
        reply = loads_object(body)
        if reply is None:
            raise UpstreamError("The Gemini channel's answer is not a JSON object.")
        response_id = str(reply.get("responseId") or "")
        choices = []
        for position, candidate in enumerate(reply.get("candidates") or ()):
            if not isinstance(candidate, dict):
                continue
            index = candidate.get("index", position)
            text: list[str] = []
            thoughts: list[str] = []
            calls: list[dict[str, Any]] = []
            for part in (candidate.get("content") or {}).get("parts") or ():
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("text"), str):
                    (thoughts if part.get("thought") else text).append(part["text"])
                call = part.get("functionCall")
                if isinstance(call, dict):
                    calls.append(
                        {
                            "id": _call_id(call, part),
                            "type": "function",
                            "function": {
                                "name": str(call.get("name") or ""),
                                "arguments": orjson.dumps(call.get("args") or {}).decode(),
                            },
                        }
                    )
            message: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(text) if text or not calls else None,
            }
            if calls:
                message["tool_calls"] = calls
            if thoughts:
                message["reasoning_content"] = "".join(thoughts)
            finish = _finish(candidate.get("finishReason"), bool(calls))
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
        usage = _usage(reply.get("usageMetadata"))
        return completion(response_id, str(reply.get("modelVersion") or model), choices, usage), usage

    def decoder(self, model: str, *, include_usage: bool) -> GeminiStream:
        return GeminiStream(model, include_usage=include_usage)

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        parsed = loads_object(body)
        error = parsed.get("error") if parsed is not None else None
        if not isinstance(error, dict):
            return status, error_body(f"The Gemini channel answered {status}.", "upstream_error")
        message = str(error.get("message") or "")
        kind = str(error.get("status") or "UNKNOWN")
        if status == 400 and "API key not valid" in message:
            # Google answers a wrong key with 400: it is the channel's credentials, not the caller's body.
            status = 401
        return status, error_body(message, kind)


class GeminiStream:
    """Gemini's SSE chunks -> OpenAI chunks; see the module docstring."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self._reader = EventReader()
        self._model = model
        self._include_usage = include_usage
        self._writer: ChunkWriter | None = None
        self._started: set[int] = set()
        # Tool calls sent so far, per choice.
        self._calls: dict[int, int] = {}
        self._finished = False
        # The last usageMetadata: every chunk repeats the counts so far, read once when asked for.
        self._report: Any = None
        self.done = False
        self.events = 0

    @property
    def usage(self) -> Usage | None:
        return _usage(self._report)

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for payload in self._reader.feed(data):
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                self._chunk(chunk, out)
        return b"".join(out)

    def flush(self) -> bytes:
        if not self._finished or self._reader.pending:
            return b""
        self.done = True
        if self._include_usage and self.usage is not None and self._writer is not None:
            return self._writer.usage(self.usage) + DONE
        return DONE

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        writer = self._writer
        if writer is None:
            writer = self._writer = ChunkWriter(
                str(chunk.get("responseId") or ""), str(chunk.get("modelVersion") or self._model)
            )
        error = chunk.get("error")
        if isinstance(error, dict):
            out.append(
                b"data: "
                + error_body(str(error.get("message") or ""), str(error.get("status") or ""))
                + b"\n\n"
            )
            return
        report = chunk.get("usageMetadata")
        if report is not None:
            self._report = report
        for position, candidate in enumerate(chunk.get("candidates") or ()):
            if not isinstance(candidate, dict):
                continue
            index = candidate.get("index", position)
            for part in (candidate.get("content") or {}).get("parts") or ():
                if not isinstance(part, dict):
                    continue
                delta: dict[str, Any]
                call = part.get("functionCall")
                if isinstance(call, dict):
                    number = self._calls.get(index, 0)
                    self._calls[index] = number + 1
                    arguments = orjson.dumps(call.get("args") or {}).decode()
                    delta = tool_call_delta(
                        number, _call_id(call, part), str(call.get("name") or ""), arguments
                    )
                elif isinstance(part.get("text"), str):
                    delta = {"reasoning_content" if part.get("thought") else "content": part["text"]}
                else:
                    continue
                if index not in self._started:
                    self._started.add(index)
                    delta["role"] = "assistant"
                self.events += 1
                out.append(writer.delta(delta, index=index))
            reason = candidate.get("finishReason")
            if reason:
                self._finished = True
                if index not in self._started:
                    self._started.add(index)
                    out.append(writer.delta({"role": "assistant", "content": ""}, index=index))
                out.append(writer.delta({}, index=index, finish=_finish(reason, index in self._calls)))


GEMINI = GeminiProvider()
