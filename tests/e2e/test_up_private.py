"""`relaygate up --demo`: the embedded default (SQLite, local broker, four processes, no Redis) serves
the documented OpenAI SDK call and stops cleanly on Ctrl-C; it keeps its state private: random secrets
generated once and reused, nothing group- or world-readable in the data directory, no control bytes
from callers in its (text) logs.

One start serves all of it (each start is a broker and four processes), and a second start the reuse."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from devinfra.processes import free_port, port_accepts
from tests.e2e.relaygate_up import start_up

# The relay refuses C0 controls in a model name (400), so the model that reaches its log (in the 404's
# message) carries what passes that check: a line separator, a bidi override and a C1 escape.
BREAKING_MODEL = "demo-model\n{fake log line}\x1b[31m"
HOSTILE_MODEL = "demo-model\u2028{fake log line}\u202e\x9b31m"
UNSAFE = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def read_until(process: subprocess.Popen[str], pattern: str, timeout: float = 60) -> dict[str, str]:
    """Lines printed until one matches ``pattern``; returns the values of every ``name: rg-...`` line."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return {m[1]: m[2] for m in re.finditer(r"(\w[\w ]*?) key:\s+(rg-\S+)", "".join(seen))}
    raise AssertionError(f"{pattern!r} not printed; output was:\n{''.join(seen)}")


def stop(process: subprocess.Popen[str], port: int) -> None:
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert not port_accepts(port)


def exposed(data_dir: Path) -> list[str]:
    """Files and directories under ``data_dir`` that anyone but the owner may read, write or enter."""
    found = []
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(f"{path.relative_to(data_dir)} {oct(mode & 0o777)}")
    return found


def send_raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    # Files an earlier version left world-readable, in directories made under a permissive umask.
    for directory, name in (("logs", "auth.log"), ("kafka", "server.properties")):
        (tmp_path / directory).mkdir(mode=0o755)
        (tmp_path / directory).chmod(0o755)
        (tmp_path / directory / name).write_text("from an earlier start\n")
        (tmp_path / directory / name).chmod(0o644)
    yield tmp_path


def test_up_demo_serves_the_sdk_keeps_its_state_private_and_escapes_logs(data_dir: Path) -> None:
    port = free_port()
    process = start_up(data_dir, port, "--demo")
    try:
        printed = read_until(process, r"press Ctrl-C to stop")
        admin_key, demo_key = printed["admin"], printed["demo"]
        relay = f"http://127.0.0.1:{port}"

        client = openai.OpenAI(base_url=f"{relay}/v1", api_key=demo_key, max_retries=0)
        reply = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "hello"}], max_tokens=3
        )
        assert reply.choices[0].message.content == "tok0 tok1 tok2 "
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        assert (data_dir / "relaygate.db").exists()
        assert (data_dir / "admin-key").read_text().strip() == admin_key
        assert oct((data_dir / "admin-key").stat().st_mode & 0o777) == "0o600"

        body = {"model": HOSTILE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        refused = httpx.post(
            f"{relay}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {demo_key}"}
        )
        assert refused.status_code == 404, refused.text
        breaking = httpx.post(
            f"{relay}/v1/chat/completions",
            json={**body, "model": BREAKING_MODEL},
            headers={"authorization": f"Bearer {demo_key}"},
        )
        assert breaking.status_code in (400, 404), breaking.text
        served = httpx.post(
            f"{relay}/v1/chat/completions",
            json={**body, "model": "demo-model"},
            headers={"authorization": f"Bearer {demo_key}"},
            timeout=10,
        )
        assert served.status_code == 200, served.text
        # A control byte in a header value, sent raw (clients refuse to): never logged raw.
        send_raw(
            port,
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-request-id: a\x1b[31mb\r\n"
            b"authorization: Bearer " + demo_key.encode() + b"\r\nconnection: close\r\n\r\n",
        )
        with httpx.Client(base_url=relay, timeout=10) as admin:
            token = admin.post("/admin/v1/tokens", headers={"authorization": f"Bearer {admin_key}"}).json()
            users = admin.get("/admin/v1/users", headers={"authorization": f"Bearer {token['token']}"})
        admin_ids = [u["user_id"] for u in users.json()["users"] if u["admin"]]
        assert admin_ids and "usr_admin" not in admin_ids
        assert token["user_id"] == admin_ids[0]
        time.sleep(0.5)  # the relay's warning about the unknown model reaches its log

        secrets = json.loads((data_dir / "secrets.json").read_text())
        assert set(secrets) == {"key_pepper", "admin_token_secret"}
        assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in secrets.values())
        assert secrets["key_pepper"] != secrets["admin_token_secret"]
        assert exposed(data_dir) == []
        relay_log = (data_dir / "logs" / "relay.log").read_bytes()
        assert b"\\u2028{fake log line}\\u202e\\x9b31m" in relay_log
        # The services' own logs (the broker's and the fake upstream's are not relaygate's format).
        for service in ("auth", "quota", "logger", "relay"):
            content = (data_dir / "logs" / f"{service}.log").read_bytes()
            assert not UNSAFE.search(content), f"{service}.log: {UNSAFE.search(content)}"
            assert not any(row.startswith(b"{fake log line}") for row in content.splitlines())
    finally:
        stop(process, port)

    # The second start reuses the secrets: the admin key kept from the first start still works.
    process = start_up(data_dir, port)
    try:
        read_until(process, r"press Ctrl-C to stop")
        response = httpx.post(
            f"http://127.0.0.1:{port}/admin/v1/tokens", headers={"authorization": f"Bearer {admin_key}"}
        )
        assert response.status_code == 201, response.text
        assert json.loads((data_dir / "secrets.json").read_text()) == secrets
        assert exposed(data_dir) == []
    finally:
        stop(process, port)


def test_up_refuses_a_data_dir_made_with_the_published_secrets(tmp_path: Path) -> None:
    # The layout before secrets were generated: an admin key, no secrets file.
    (tmp_path / "admin-key").write_text("rg-AbCdEf012345-" + "x" * 32 + "\n")
    process = start_up(tmp_path, free_port())
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "published development secrets" in output
    assert not (tmp_path / "secrets.json").exists()
