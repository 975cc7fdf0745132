"""`relaygate up --demo`: the embedded default (SQLite, local broker, four processes, no Redis) serves
the documented OpenAI SDK call and stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import openai

from devinfra.processes import free_port, port_accepts
from tests.e2e.relaygate_up import start_up


def wait_for_line(process: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} not printed; output was:\n{''.join(seen)}")


def test_up_demo_answers_the_sdk_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    process = start_up(tmp_path, port, "--demo")
    try:
        admin = wait_for_line(process, r"admin key:\s+(rg-\S+)", 60)
        demo = wait_for_line(process, r"demo key:\s+(rg-\S+)", 60)
        wait_for_line(process, r"press Ctrl-C to stop", 10)

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=demo.group(1), max_retries=0)
        reply = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "hello"}], max_tokens=3
        )
        assert reply.choices[0].message.content == "tok0 tok1 tok2 "
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        assert (tmp_path / "relaygate.db").exists()
        assert (tmp_path / "admin-key").read_text().strip() == admin.group(1)
        assert oct((tmp_path / "admin-key").stat().st_mode & 0o777) == "0o600"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    assert not port_accepts(port)
