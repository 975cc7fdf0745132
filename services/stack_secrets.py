"""The secrets of a local stack: the key pepper and the admin-token signing secret.

Nothing in relaygate has a default for either: a value anyone can read would let them mint admin
tokens. A :class:`~services.stack.LocalStack` started for tests or benchmarks draws fresh ones;
``relaygate up`` draws them once per data directory and keeps them in a ``0600`` file next to the admin
key (:func:`load_or_create`), since the pepper must stay the same for the stored key hashes to match.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SECRETS_FILE = "secrets.json"
# 32 random bytes, hex: 64 characters, well past what production settings require.
_SECRET_BYTES = 32


class SecretsFileError(RuntimeError):
    """The secrets file exists but cannot be used; the message says what to do."""


@dataclass(frozen=True)
class StackSecrets:
    key_pepper: str
    admin_token_secret: str

    def __repr__(self) -> str:
        return "StackSecrets(<hidden>)"

    @classmethod
    def generate(cls) -> StackSecrets:
        return cls(
            key_pepper=secrets.token_hex(_SECRET_BYTES),
            admin_token_secret=secrets.token_hex(_SECRET_BYTES),
        )

    def env(self) -> dict[str, str]:
        """The ``RELAYGATE_*`` variables auth reads them from."""
        return {
            "RELAYGATE_KEY_PEPPER": self.key_pepper,
            "RELAYGATE_ADMIN_TOKEN_SECRET": self.admin_token_secret,
        }


def load_or_create(path: Path) -> tuple[StackSecrets, bool]:
    """The secrets kept at ``path``, created (mode 0600, never overwritten) when absent; and whether
    this call created them."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        created = StackSecrets.generate()
        body = json.dumps(
            {"key_pepper": created.key_pepper, "admin_token_secret": created.admin_token_secret}
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # Another `up` on the same directory won the race: use its secrets.
            return load_or_create(path)
        with os.fdopen(fd, "w") as handle:
            handle.write(body + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return created, True
    try:
        values = json.loads(raw)
        loaded = StackSecrets(
            key_pepper=str(values["key_pepper"]), admin_token_secret=str(values["admin_token_secret"])
        )
    except (ValueError, KeyError, TypeError):
        raise SecretsFileError(
            f"{path} is damaged; the keys stored with it cannot be verified without it. "
            "Restore it from a backup, or move the data directory away and start afresh."
        ) from None
    if not loaded.key_pepper or not loaded.admin_token_secret:
        raise SecretsFileError(f"{path} holds an empty secret; restore it or start with a new data directory")
    os.chmod(path, 0o600)
    return loaded, False
