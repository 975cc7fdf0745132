"""Reasoning as the fake upstream produces it: the thinking text, and the opaque signatures the real
APIs attach to it (and check when a later turn sends it back).

A reply's thinking is ``reasoning_tokens`` words, ``thought0 thought1 ...`` (one word per token, as the
answer's ``tok`` words), so the thinking a caller sees and the reasoning tokens it is billed for agree.
A signature is the base64 SHA-256 of the thinking text (Anthropic's ``signature``) or of the function
call (Gemini's ``thoughtSignature``) under a fixed prefix: a caller cannot make one up without this
module, and any change to the signed text or call makes it wrong, which is what the real APIs check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from functools import lru_cache
from typing import Any

import orjson

__all__ = [
    "call_signature",
    "redacted_data",
    "signature_of",
    "signed_call",
    "thinking_text",
    "thinking_words",
    "valid_signature",
]


@lru_cache(maxsize=64)
def thinking_words(count: int) -> tuple[str, ...]:
    """The words of ``count`` thinking tokens, each followed by one space."""
    return tuple(f"thought{index} " for index in range(count))


def thinking_text(count: int) -> str:
    return "".join(thinking_words(count))


def _digest(kind: bytes, data: bytes) -> bytes:
    return hashlib.sha256(b"fake-upstream " + kind + b"\0" + data).digest()


def signature_of(thinking: str) -> str:
    """Anthropic's ``signature`` of a thinking block's text."""
    return base64.b64encode(_digest(b"thinking", thinking.encode())).decode()


def valid_signature(thinking: str, signature: str) -> bool:
    return signature == signature_of(thinking)


def redacted_data(thinking: str) -> str:
    """The opaque ``data`` of a ``redacted_thinking`` block standing for ``thinking``."""
    return base64.b64encode(_digest(b"redacted", thinking.encode()) + thinking.encode()).decode()


def _call_bytes(name: str, args: Any) -> bytes:
    return name.encode() + b"\0" + orjson.dumps(args, option=orjson.OPT_SORT_KEYS)


def call_signature(name: str, args: Any) -> str:
    """Gemini's ``thoughtSignature`` of a function call (bytes in the API, base64 in its JSON)."""
    return base64.b64encode(_digest(b"thought", _call_bytes(name, args))).decode()


def signed_call(name: str, args: Any, signature: Any) -> bool:
    """Whether ``signature`` is the one :func:`call_signature` gave this call. Either base64
    alphabet is taken: an SDK may send the bytes back url-safe."""
    if not isinstance(signature, str) or not signature:
        return False
    try:
        sent = base64.b64decode(signature.replace("-", "+").replace("_", "/"), validate=True)
    except binascii.Error:
        return False
    return sent == _digest(b"thought", _call_bytes(name, args))
