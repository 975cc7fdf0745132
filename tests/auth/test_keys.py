"""Key format, hashing and scope validation: pure functions, no backing services."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import pytest
from pydantic import ValidationError

from services.auth import keys
from services.auth.settings import AuthSettings
from services.common.errors import InvalidRequest

VALID = "rg-AbCdEf012345-" + "x" * 16 + "Y" * 16


def test_generate_produces_parsable_alphanumeric_keys() -> None:
    seen = set()
    for _ in range(200):
        plaintext, public_id, secret = keys.generate()
        assert plaintext == f"rg-{public_id}-{secret}"
        assert re.fullmatch(r"[A-Za-z0-9]{12}", public_id)
        assert re.fullmatch(r"[A-Za-z0-9]{32}", secret)
        assert keys.parse(plaintext) == (public_id, secret)
        seen.add(public_id)
    assert len(seen) == 200


def test_parse_accepts_the_documented_format() -> None:
    assert keys.parse(VALID) == ("AbCdEf012345", "x" * 16 + "Y" * 16)


@pytest.mark.parametrize(
    "candidate",
    [
        pytest.param("", id="empty"),
        pytest.param("rg-", id="prefix-only"),
        pytest.param("sk-AbCdEf012345-" + "x" * 32, id="other-prefix"),
        pytest.param("RG-AbCdEf012345-" + "x" * 32, id="uppercase-prefix"),
        pytest.param(VALID[:-1], id="secret-too-short"),
        pytest.param(VALID + "x", id="secret-too-long"),
        pytest.param("rg-AbCdEf01234-" + "x" * 33, id="public-id-too-short"),
        pytest.param("rg-AbCdEf0123456" + "x" * 32, id="missing-separator"),
        pytest.param("rg-AbCdEf012345_" + "x" * 32, id="wrong-separator"),
        pytest.param("rg-AbCd-f012345-" + "x" * 32, id="dash-inside-public-id"),
        pytest.param("rg-AbCdEf012345-" + "x" * 31 + "-", id="dash-inside-secret"),
        pytest.param("rg-AbCdEf012345-" + "x" * 31 + "é", id="non-ascii-letter"),
        pytest.param("rg-AbCdEf012345-" + "x" * 31 + "٣", id="non-ascii-digit"),
        pytest.param(" " + VALID[1:], id="leading-space"),
        pytest.param(VALID[:-1] + "\n", id="trailing-newline"),
        pytest.param("Bearer " + VALID, id="with-scheme"),
        pytest.param("rg-" + "A" * 1_000_000, id="huge"),
    ],
)
def test_parse_rejects_malformed_input(candidate: str) -> None:
    assert keys.parse(candidate) is None


def test_hash_is_hmac_sha256_of_the_secret_under_the_pepper() -> None:
    digest = keys.hash_secret("pepper", "secret")
    assert digest == hmac.new(b"pepper", b"secret", hashlib.sha256).digest()
    assert len(digest) == 32
    assert keys.hash_secret("other pepper", "secret") != digest


def test_verify_secret() -> None:
    stored = keys.hash_secret("pepper", "secret")
    assert keys.verify_secret("pepper", "secret", stored)
    assert not keys.verify_secret("pepper", "secreT", stored)
    assert not keys.verify_secret("other", "secret", stored)
    # An unknown key never verifies, not even against the dummy hash's own preimage space.
    assert not keys.verify_secret("pepper", "secret", None)


def test_display_prefix_and_fingerprint_never_reveal_the_secret() -> None:
    plaintext, public_id, secret = keys.generate()
    assert keys.display_prefix(public_id) == f"rg-{public_id[:6]}…"
    assert keys.fingerprint(plaintext) == hashlib.sha256(plaintext.encode()).hexdigest()
    assert secret not in keys.fingerprint(plaintext)


@pytest.mark.parametrize(
    ("scope", "param"),
    [
        pytest.param(keys.KeyScope(name="n" * 201), "name", id="long-name"),
        pytest.param(keys.KeyScope(allowed_cidrs=("10.0.0.0/33",)), "allowed_cidrs", id="bad-cidr"),
        pytest.param(keys.KeyScope(allowed_cidrs=("example.com",)), "allowed_cidrs", id="hostname"),
        pytest.param(keys.KeyScope(allowed_models=("",)), "allowed_models", id="empty-model"),
        pytest.param(keys.KeyScope(allowed_models=("m",) * 257), "allowed_models", id="too-many-models"),
        pytest.param(keys.KeyScope(expires_at=999), "expires_at", id="expired-already"),
        pytest.param(keys.KeyScope(expires_at=-1), "expires_at", id="negative-expiry"),
        pytest.param(keys.KeyScope(limits={"rpm": -1}), "limits", id="negative-limit"),
        pytest.param(keys.KeyScope(metadata={"k": "v" * 2000}), "metadata", id="huge-metadata"),
    ],
)
def test_scope_validation_names_the_field(scope: keys.KeyScope, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        scope.validate(now=1000)
    assert caught.value.param == param


def test_valid_scope_passes() -> None:
    keys.KeyScope(
        name="ci",
        allowed_models=("gpt-4o*",),
        allowed_cidrs=("10.0.0.0/8", "192.168.1.7", "2001:db8::/32"),
        expires_at=2000,
        limits={"rpm": 60},
        metadata={"team": "search"},
    ).validate(now=1000)


PUBLISHED = "relaygate-dev-secret-do-not-use-in-production"  # shipped as the default until it was removed
PEPPER = secrets.token_hex(32)
TOKEN_SECRET = secrets.token_hex(32)


@pytest.mark.parametrize("environment", ["dev", "prod"])
def test_settings_have_no_default_secrets(environment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RELAYGATE_KEY_PEPPER", "RELAYGATE_ADMIN_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="RELAYGATE_KEY_PEPPER is not set"):
        AuthSettings(environment=environment, admin_token_secret=TOKEN_SECRET)
    with pytest.raises(ValidationError, match="RELAYGATE_ADMIN_TOKEN_SECRET is not set"):
        AuthSettings(environment=environment, key_pepper=PEPPER)
    with pytest.raises(ValidationError, match="RELAYGATE_KEY_PEPPER holds a published value"):
        AuthSettings(environment=environment, key_pepper=PUBLISHED, admin_token_secret=TOKEN_SECRET)
    with pytest.raises(ValidationError, match="must differ"):
        AuthSettings(environment=environment, key_pepper=PEPPER, admin_token_secret=PEPPER)
    settings = AuthSettings(environment=environment, key_pepper=PEPPER, admin_token_secret=TOKEN_SECRET)
    assert settings.key_pepper == PEPPER


def test_prod_refuses_short_or_patterned_secrets() -> None:
    AuthSettings(key_pepper="short-dev-pepper", admin_token_secret=TOKEN_SECRET)
    with pytest.raises(ValidationError, match="at least 32"):
        AuthSettings(environment="prod", key_pepper="short-dev-pepper", admin_token_secret=TOKEN_SECRET)
    with pytest.raises(ValidationError, match="RELAYGATE_ADMIN_TOKEN_SECRET looks like a pattern"):
        AuthSettings(environment="prod", key_pepper=PEPPER, admin_token_secret="ab" * 20)


def test_settings_refuse_a_malformed_bootstrap_key_without_echoing_it() -> None:
    almost = VALID[:-1] + "!"
    with pytest.raises(ValidationError) as caught:
        AuthSettings(key_pepper=PEPPER, admin_token_secret=TOKEN_SECRET, bootstrap_admin_key=almost)
    assert "RELAYGATE_BOOTSTRAP_ADMIN_KEY" in str(caught.value)
    assert almost not in str(caught.value)
    settings = AuthSettings(key_pepper=PEPPER, admin_token_secret=TOKEN_SECRET, bootstrap_admin_key=VALID)
    assert settings.bootstrap_admin_key == VALID


def test_settings_repr_hides_secrets() -> None:
    settings = AuthSettings(key_pepper=PEPPER, admin_token_secret=TOKEN_SECRET, bootstrap_admin_key=VALID)
    assert PEPPER not in repr(settings)
    assert TOKEN_SECRET not in repr(settings)
    assert VALID not in repr(settings)
