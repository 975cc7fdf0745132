"""What ships with relaygate holds no usable secret: the image runs in prod (refusing weak secrets), the
dev overlay's script draws fresh ones, and no tracked file contains a value that was once published."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.auth.settings import AuthSettings
from services.common import config
from tests.deploy.test_manifests import kubectl

ROOT = Path(__file__).resolve().parents[2]
# The one place the published value may appear: the test proving it is refused.
ALLOWED = {"tests/auth/test_keys.py"}


def image_environment() -> dict[str, str]:
    """The ENV of the Dockerfile's last stage."""
    final = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text()).split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.strip().startswith("ENV "):
            for pair in line.split()[1:]:
                name, equals, value = pair.partition("=")
                if equals:
                    env[name] = value
    return env


def test_the_image_defaults_to_prod_which_refuses_weak_secrets() -> None:
    environment = image_environment()["RELAYGATE_ENVIRONMENT"]
    assert environment == "prod"
    with pytest.raises(ValidationError, match="at least 32"):
        AuthSettings(environment=environment, key_pepper="pepper", admin_token_secret="secret")


def dev_overlay_auth_secret() -> dict[str, str]:
    result = subprocess.run(
        ["bash", str(ROOT / "deploy/k8s/overlays/dev/create-secrets.sh")],
        env={**os.environ, "DRY_RUN": "1", "KUBECTL": kubectl()},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for doc in yaml.safe_load_all(result.stdout):
        if doc and doc["metadata"]["name"] == "relaygate-auth":
            return {key: base64.b64decode(value).decode() for key, value in doc["data"].items()}
    raise AssertionError("create-secrets.sh made no relaygate-auth Secret")


def test_the_dev_overlay_draws_fresh_secrets_that_prod_accepts() -> None:
    first, second = dev_overlay_auth_secret(), dev_overlay_auth_secret()
    for name in ("key-pepper", "admin-token-secret"):
        assert first[name] != second[name]
    AuthSettings(
        environment="prod", key_pepper=first["key-pepper"], admin_token_secret=first["admin-token-secret"]
    )


def test_no_tracked_file_holds_a_published_secret() -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    token = re.compile(rb"[A-Za-z0-9_\-]{16,}")
    found = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or name in ALLOWED or not path.is_file():
            continue
        for candidate in token.findall(path.read_bytes()):
            if hashlib.sha256(candidate).hexdigest() in config._PUBLISHED_SECRET_DIGESTS:
                found.append(name)
    assert found == []
