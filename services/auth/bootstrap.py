"""The first admin credential, provided from outside (``relaygate up``, a Kubernetes Secret).

When ``RELAYGATE_BOOTSTRAP_ADMIN_KEY`` holds a full key, every auth process ensures at startup that the
admin user (id :func:`admin_user_id`, name "admin") exists and owns a key with exactly that plaintext.
The user id is derived from the pepper: every replica computes the same one, and nobody without the
pepper can predict it (a fixed, published id would be half of a forged admin token).
It is idempotent across restarts and safe when several replicas start at once (see
:meth:`AuthStore.insert_if_absent`). Changing the variable adds the new key to the same admin user; the
old key stays valid until revoked. A revoked bootstrap key is never brought back.

Neither the key nor its secret is ever logged; only its key id and display prefix are.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging

from services.auth.keys import display_prefix, hash_secret, parse, verify_secret
from services.auth.store import AuthStore

log = logging.getLogger(__name__)

ADMIN_USER_NAME = "admin"
KEY_NAME = "bootstrap admin key"


def admin_user_id(pepper: str) -> str:
    """The bootstrap admin's user id: ``usr_`` and 32 hex characters of an HMAC under the pepper."""
    digest = hmac.new(pepper.encode(), b"relaygate bootstrap admin user", hashlib.sha256).hexdigest()
    return f"usr_{digest[:32]}"


class BootstrapError(RuntimeError):
    """The configured key conflicts with what the database holds; auth refuses to start."""


class Outcome(enum.StrEnum):
    CREATED = "created"
    EXISTS = "exists"
    REVOKED = "revoked"


async def ensure_admin_key(store: AuthStore, *, api_key: str, pepper: str, now: int) -> Outcome:
    """Make sure the admin user owns ``api_key``; report whether it was created, present, or revoked.

    Raises :class:`BootstrapError` when the key is malformed, or when a key with the same public id
    exists with another secret (or the pepper changed since it was stored).
    """
    parsed = parse(api_key)
    if parsed is None:
        raise BootstrapError("the bootstrap admin key is malformed")
    public_id, secret = parsed
    credential = await store.find_credential(public_id, consistent=True)
    created = False
    if credential is None:
        created = await store.insert_if_absent(
            user_id=admin_user_id(pepper),
            user_name=ADMIN_USER_NAME,
            admin=True,
            public_id=public_id,
            secret_hash=hash_secret(pepper, secret),
            key_name=KEY_NAME,
            now=now,
        )
        credential = await store.find_credential(public_id, consistent=True)
    if credential is None or not verify_secret(pepper, secret, credential.key.secret_hash):
        raise BootstrapError(
            f"a key with the bootstrap key's public id ({display_prefix(public_id)}) exists with another "
            "secret, or RELAYGATE_KEY_PEPPER changed since it was stored"
        )
    fields = {"key_id": credential.key.id, "user_id": credential.user.id, "prefix": display_prefix(public_id)}
    if credential.key.revoked:
        log.warning("the bootstrap admin key is revoked; leaving it revoked", extra=fields)
        return Outcome.REVOKED
    if not credential.user.admin:
        log.warning("the bootstrap admin key's user is not an admin", extra=fields)
    log.info("bootstrap admin key %s", "created" if created else "present", extra=fields)
    return Outcome.CREATED if created else Outcome.EXISTS
