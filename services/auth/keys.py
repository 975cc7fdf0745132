"""API keys: the ``rg-<public_id>-<secret>`` format, its keyed hash, and what a new key may be scoped to.

A key has two halves. ``public_id`` (12 characters) is stored as is and finds the row; ``secret``
(32 characters) is stored only as ``HMAC-SHA256(pepper, secret)``, so a leaked table alone cannot be
used to authenticate, and a leaked pepper alone reveals nothing. Both halves are drawn from
``[A-Za-z0-9]`` so that ``-`` separates them unambiguously and keys survive copy-paste and URLs.

The plaintext exists only in the :func:`generate` result handed back once to the creator; nothing in
this package logs or stores it. Caches are keyed by :func:`fingerprint` (SHA-256 of the plaintext).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field

from services.common.errors import InvalidRequest

PREFIX = "rg-"
PUBLIC_ID_LENGTH = 12
SECRET_LENGTH = 32
KEY_LENGTH = len(PREFIX) + PUBLIC_ID_LENGTH + 1 + SECRET_LENGTH

_KEY_PATTERN = re.compile(
    rf"rg-([A-Za-z0-9]{{{PUBLIC_ID_LENGTH}}})-([A-Za-z0-9]{{{SECRET_LENGTH}}})", re.ASCII
)

# Verifying a key whose public id is unknown still computes an HMAC and compares it against this value,
# so "no such key" costs the same hashing work as "wrong secret" (as FastAPI's template does with its
# DUMMY_HASH). Any 32-byte value works: compare_digest's time does not depend on the contents. What
# timing can still tell apart (a miss is also asked on the primary) is whether a public id exists, which
# says nothing about any secret.
DUMMY_HASH = hashlib.sha256(b"relaygate: no key has this hash").digest()

# Bounds that keep one key's row and cached principal small.
MAX_NAME_LENGTH = 200
MAX_SCOPE_ENTRIES = 256
MAX_SCOPE_ENTRY_LENGTH = 200
MAX_METADATA_ENTRIES = 64
MAX_METADATA_LENGTH = 1024


def _alphanumeric(length: int) -> str:
    """``length`` characters uniformly drawn from ``[A-Za-z0-9]``.

    ``token_urlsafe`` draws uniformly from 64 symbols; dropping ``-`` and ``_`` leaves a uniform draw
    from the other 62.
    """
    out = ""
    while len(out) < length:
        out += secrets.token_urlsafe(length).replace("-", "").replace("_", "")
    return out[:length]


def generate() -> tuple[str, str, str]:
    """A new key as ``(plaintext, public_id, secret)``; show the plaintext once, store only the hash."""
    public_id = _alphanumeric(PUBLIC_ID_LENGTH)
    secret = _alphanumeric(SECRET_LENGTH)
    return f"{PREFIX}{public_id}-{secret}", public_id, secret


def parse(plaintext: str) -> tuple[str, str] | None:
    """``(public_id, secret)`` of a well-formed key, else ``None``.

    The length is checked before the pattern so arbitrarily long input is refused in constant time.
    No normalisation happens here: surrounding whitespace makes a key malformed.
    """
    if len(plaintext) != KEY_LENGTH:
        return None
    match = _KEY_PATTERN.fullmatch(plaintext)
    if match is None:
        return None
    return match.group(1), match.group(2)


def hash_secret(pepper: str, secret: str) -> bytes:
    """The stored form of a secret: ``HMAC-SHA256(pepper, secret)``, 32 bytes."""
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).digest()


def verify_secret(pepper: str, secret: str, stored_hash: bytes | None) -> bool:
    """Whether ``secret`` matches ``stored_hash``, in constant time; ``None`` (unknown key) never matches.

    The unknown case does the same work as a wrong secret (see :data:`DUMMY_HASH`).
    """
    candidate = hash_secret(pepper, secret)
    matches = hmac.compare_digest(candidate, DUMMY_HASH if stored_hash is None else stored_hash)
    return matches and stored_hash is not None


def fingerprint(plaintext: str) -> str:
    """SHA-256 hex of the whole key: the cache key for a verified principal (never the plaintext itself)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generation(public_id: str) -> str:
    """A short digest of a key's public id: it changes when the key is rotated, and reveals nothing of it.

    Admin tokens carry it, so rotating their key ends them too.
    """
    return hashlib.sha256(f"relaygate key generation:{public_id}".encode()).hexdigest()[:16]


def display_prefix(public_id: str) -> str:
    """The part of a key that is safe to show in listings: ``rg-AbCdEf…``."""
    return f"{PREFIX}{public_id[:6]}…"


@dataclass(frozen=True)
class KeyScope:
    """What a new key may do: its name, allowed models and addresses, expiry, limits and metadata.

    ``limits`` maps names of ``relaygate.common.v1.Limits`` fields to positive integers (absent = no
    limit). :meth:`validate` refuses input that could never match or that is unreasonably large.
    """

    name: str = ""
    allowed_models: tuple[str, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()
    expires_at: int = 0
    limits: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def validate(self, *, now: int) -> None:
        """Raise :class:`InvalidRequest` naming the offending field; ``now`` is unix seconds."""
        if len(self.name) > MAX_NAME_LENGTH:
            raise InvalidRequest(f"The key name exceeds {MAX_NAME_LENGTH} characters.", param="name")
        scopes = (("allowed_models", self.allowed_models), ("allowed_cidrs", self.allowed_cidrs))
        for param, entries in scopes:
            if len(entries) > MAX_SCOPE_ENTRIES:
                raise InvalidRequest(f"At most {MAX_SCOPE_ENTRIES} entries are allowed.", param=param)
            if any(not entry or len(entry) > MAX_SCOPE_ENTRY_LENGTH for entry in entries):
                raise InvalidRequest(
                    f"Entries must be non-empty and at most {MAX_SCOPE_ENTRY_LENGTH} characters.", param=param
                )
        for cidr in self.allowed_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise InvalidRequest(
                    f"{cidr!r} is not an IP address or CIDR block.", param="allowed_cidrs"
                ) from None
        if self.expires_at < 0 or (self.expires_at and self.expires_at <= now):
            raise InvalidRequest("expires_at must be in the future (unix seconds), or 0.", param="expires_at")
        if any(value < 0 for value in self.limits.values()):
            raise InvalidRequest("Limits must not be negative (0 means no limit).", param="limits")
        if len(self.metadata) > MAX_METADATA_ENTRIES or any(
            len(k) + len(v) > MAX_METADATA_LENGTH for k, v in self.metadata.items()
        ):
            raise InvalidRequest(
                f"At most {MAX_METADATA_ENTRIES} metadata entries of {MAX_METADATA_LENGTH} characters.",
                param="metadata",
            )
