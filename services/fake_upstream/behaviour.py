"""What the fake upstream does: a validated, runtime-changeable :class:`Behaviour`.

Every field can be set at construction, from the command line / environment (text form, see
:func:`parse_text`) and at runtime through ``POST /_fake/behaviour`` (JSON form, see
:meth:`Behaviour.update`). Updates are validated as a whole before anything changes, so a rejected
update leaves the behaviour untouched.

Failure modes (``drop_connection``, ``hang``, ``fail_status``, ``drop_after_chunks``) apply to every
path outside ``/_fake/``. While at least one is set, each request that a mode applies to consumes one
unit of ``fail_count`` (``-1`` means unlimited); once it reaches ``0`` the modes stay configured but
inert, which is how "fail twice, then succeed" retry scenarios are written. When several modes are
set, the first in the order above wins. ``drop_after_chunks`` applies to streaming requests only, so
non-streaming requests neither see it nor consume ``fail_count`` for it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODELS: tuple[str, ...] = ("fake-chat", "fake-embedding", "fake-image")


class Failure(enum.Enum):
    """The failure injected into one request, as chosen by :meth:`Behaviour.take_failure`."""

    DROP_CONNECTION = "drop_connection"
    HANG = "hang"
    STATUS = "fail_status"
    DROP_MID_STREAM = "drop_after_chunks"


@dataclass(slots=True)
class Behaviour:
    """The knobs of the fake upstream. Mutable, but only ever changed through :meth:`update`.

    Timing:
        latency_ms: delay before the response starts (before the first byte), on every path
            outside ``/_fake/``, failures included.
        chunk_interval_ms: delay before each content chunk of a stream.

    Content and usage:
        chunks: completion words per reply (one word per stream content chunk), before the
            ``max_tokens`` / ``max_completion_tokens`` cap.
        include_usage_always: send the final usage chunk even when the request did not ask for it
            with ``stream_options.include_usage``.
        usage_in_every_chunk: every stream chunk carries the cumulative usage so far.
        omit_usage: never report usage, neither in streams nor in non-streaming bodies (wins over the
            two fields above); OpenAI, Azure and Gemini shapes (Anthropic's always carry usage).
        embedding_dim: vector length of embeddings when the request gives no ``dimensions``.
        tool_call: when the request offers tools (OpenAI / Azure chat and Anthropic ``tools``,
            Gemini ``functionDeclarations``), end the reply with a call of the first one; a tool
            choice that names one or requires a call gets it even when this is off. See
            :mod:`.tokens` for the call's arguments and tokens.
        cached_tokens: prompt tokens reported as read from the provider's prompt cache (OpenAI
            ``prompt_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens``, Gemini
            ``cachedContentTokenCount``), capped by the prompt.
        cache_write_tokens: prompt tokens reported as written to the cache (Anthropic
            ``cache_creation_input_tokens``; the others report none), capped by what the cached
            ones leave of the prompt.
        reasoning_tokens: output tokens spent on reasoning (OpenAI
            ``completion_tokens_details.reasoning_tokens``, Anthropic
            ``output_tokens_details.thinking_tokens``, Gemini ``thoughtsTokenCount``). When an
            Anthropic request enables ``thinking`` or a Gemini one asks for ``includeThoughts``, the
            reply also shows that many thinking words (see :mod:`.thinking`).
        redacted_thinking: an Anthropic reply's thinking comes as a ``redacted_thinking`` block
            (opaque ``data``) instead of a readable, signed ``thinking`` block.

    Failures (see the module docstring for precedence and ``fail_count``):
        fail_status: answer with this HTTP status and the provider's error body (OpenAI's on the
            OpenAI and Azure paths, Anthropic's, Google's).
        retry_after: seconds until an injected 429 may be retried, as the provider says it
            (``retry-after`` header; Gemini's ``RetryInfo`` detail).
        fail_count: how many upcoming requests fail; ``-1`` means every request.
        hang: read the request, then never answer until the client gives up.
        drop_connection: read the request, then close the TCP connection without any response.
        drop_after_chunks: in a stream, send this many SSE events (the role chunk counts) and close
            the connection without the terminating chunk or ``[DONE]``.

    Catalogue and credentials:
        models: ids listed by ``GET /v1/models``.
        strict_models: reject models not in ``models`` with 404 ``model_not_found``; otherwise any
            model name is served.
        api_key: when set, inference paths require this key where their provider takes it
            (OpenAI ``Authorization: Bearer``, Azure ``api-key``, Anthropic ``x-api-key``, Gemini
            ``key`` / ``x-goog-api-key``) and refuse others as that provider does. Unset, OpenAI
            paths take any request and the other providers any non-empty key. Control paths never
            require it.

    Reproducibility:
        deterministic: reply ids and ``created`` timestamps are derived from the model and the
            prompt instead of a counter and the clock, so two equal requests get byte-identical
            replies (for comparing a relayed stream with a direct one, or a cached answer).
    """

    latency_ms: float = 0.0
    chunk_interval_ms: float = 0.0
    chunks: int = 20
    include_usage_always: bool = False
    usage_in_every_chunk: bool = False
    omit_usage: bool = False
    embedding_dim: int = 8
    tool_call: bool = False
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    redacted_thinking: bool = False
    fail_status: int | None = None
    retry_after: int = 1
    fail_count: int = -1
    hang: bool = False
    drop_connection: bool = False
    drop_after_chunks: int | None = None
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    strict_models: bool = False
    api_key: str | None = None
    deterministic: bool = False

    def __post_init__(self) -> None:
        # Constructor arguments get the same validation as runtime updates.
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, FIELDS[spec.name].validate(spec.name, getattr(self, spec.name)))

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``changes`` (field name → JSON value) atomically.

        Raises :class:`BehaviourError` naming the offending field for unknown names or invalid values;
        in that case nothing is changed.
        """
        validated: dict[str, Any] = {}
        for name, value in changes.items():
            spec = FIELDS.get(name)
            if spec is None:
                raise BehaviourError(name, f"unknown behaviour field {name!r}")
            validated[name] = spec.validate(name, value)
        for name, value in validated.items():
            setattr(self, name, value)

    def copy(self) -> Behaviour:
        """An independent copy (the ``models`` list is not shared)."""
        return dataclasses.replace(self, models=list(self.models))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as returned by the control endpoints."""
        return {spec.name: _plain(getattr(self, spec.name)) for spec in dataclasses.fields(self)}

    @property
    def failing(self) -> bool:
        """Whether any failure mode is configured (regardless of ``fail_count``)."""
        return (
            self.drop_connection
            or self.hang
            or self.fail_status is not None
            or self.drop_after_chunks is not None
        )

    def take_failure(self, *, streaming: bool) -> Failure | None:
        """Pick the failure for the next request and consume one unit of ``fail_count``.

        Returns ``None`` when the request must be served normally.
        """
        if self.fail_count == 0:
            return None
        if self.drop_connection:
            failure = Failure.DROP_CONNECTION
        elif self.hang:
            failure = Failure.HANG
        elif self.fail_status is not None:
            failure = Failure.STATUS
        elif self.drop_after_chunks is not None and streaming:
            failure = Failure.DROP_MID_STREAM
        else:
            return None
        if self.fail_count > 0:
            self.fail_count -= 1
        return failure


class BehaviourError(ValueError):
    """An invalid behaviour field name or value."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name


def parse_text(name: str, text: str) -> Any:
    """Turn the command-line / environment text form of field ``name`` into its validated value.

    Booleans accept ``true/false/1/0/yes/no/on/off``; optional fields accept ``none`` or an empty
    string for ``None``; ``models`` is a comma-separated list.
    """
    spec = FIELDS.get(name)
    if spec is None:
        raise BehaviourError(name, f"unknown behaviour field {name!r}")
    return spec.validate(name, spec.from_text(name, text.strip()))


def to_text(value: Any) -> str:
    """The inverse of :func:`parse_text`, for passing a behaviour on a command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    validate: Callable[[str, Any], Any]
    from_text: Callable[[str, str], Any]


def _int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; accepting it would let `true` mean 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BehaviourError(name, f"{name} must be an integer")
    if value < minimum:
        raise BehaviourError(name, f"{name} must be >= {minimum}")
    return value


def _int_at_least(minimum: int) -> Callable[[str, Any], int]:
    return lambda name, value: _int(name, value, minimum)


def _optional_int_at_least(minimum: int) -> Callable[[str, Any], int | None]:
    return lambda name, value: None if value is None else _int(name, value, minimum)


def _status(name: str, value: Any) -> int | None:
    if value is None:
        return None
    status = _int(name, value, 400)
    if status > 599:
        raise BehaviourError(name, f"{name} must be an HTTP error status (400-599)")
    return status


def _non_negative_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BehaviourError(name, f"{name} must be a number")
    if value < 0:
        raise BehaviourError(name, f"{name} must be >= 0")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BehaviourError(name, f"{name} must be a boolean")
    return value


def _models(name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) and item for item in value):
        raise BehaviourError(name, f"{name} must be a list of non-empty strings")
    return list(value)


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BehaviourError(name, f"{name} must be a string or null")
    return value or None


def _int_text(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BehaviourError(name, f"{name} must be an integer, got {text!r}") from None


def _optional_int_text(name: str, text: str) -> int | None:
    return None if text.lower() in ("", "none", "null") else _int_text(name, text)


def _float_text(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BehaviourError(name, f"{name} must be a number, got {text!r}") from None


_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off"))


def _bool_text(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BehaviourError(name, f"{name} must be a boolean, got {text!r}")


def _list_text(_name: str, text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _optional_str_text(_name: str, text: str) -> str | None:
    return None if text.lower() in ("", "none", "null") else text


_COUNT = _FieldSpec(_int_at_least(0), _int_text)
_MILLISECONDS = _FieldSpec(_non_negative_float, _float_text)
_FLAG = _FieldSpec(_bool, _bool_text)

FIELDS: dict[str, _FieldSpec] = {
    "latency_ms": _MILLISECONDS,
    "chunk_interval_ms": _MILLISECONDS,
    "chunks": _COUNT,
    "include_usage_always": _FLAG,
    "usage_in_every_chunk": _FLAG,
    "omit_usage": _FLAG,
    "embedding_dim": _FieldSpec(_int_at_least(1), _int_text),
    "tool_call": _FLAG,
    "cached_tokens": _COUNT,
    "cache_write_tokens": _COUNT,
    "reasoning_tokens": _COUNT,
    "redacted_thinking": _FLAG,
    "fail_status": _FieldSpec(_status, _optional_int_text),
    "retry_after": _COUNT,
    "fail_count": _FieldSpec(_int_at_least(-1), _int_text),
    "hang": _FLAG,
    "drop_connection": _FLAG,
    "drop_after_chunks": _FieldSpec(_optional_int_at_least(0), _optional_int_text),
    "models": _FieldSpec(_models, _list_text),
    "strict_models": _FLAG,
    "api_key": _FieldSpec(_optional_str, _optional_str_text),
    "deterministic": _FLAG,
}
"""Validation for every :class:`Behaviour` field, keyed by field name."""
