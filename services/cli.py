"""``relaygate``: run the whole gateway locally (``up``) and migrate a database (``migrate``).

``relaygate up`` is the embedded default: a SQLite file database, a local Apache Kafka broker and
the four services as separate processes, no Redis. ``--demo`` also starts the project's fake
OpenAI-compatible upstream, registers it as a channel with a price, and creates a funded demo key,
so a first call works offline.

Everything ``up`` keeps lives in its data directory and is private to the user running it: the
process and its children run under umask 077, and files left readable by an earlier version are
tightened on start. The key pepper and admin-token secret are generated on the first start and kept
there (``secrets.json``, 0600); no well-known value is ever used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from devinfra.processes import port_accepts
from services import admin_client
from services.auth.keys import generate
from services.common.config import DatabaseSettings
from services.migrations import upgrade
from services.stack import LocalStack
from services.stack_secrets import SECRETS_FILE, SecretsFileError, StackSecrets, load_or_create

DEMO_MODEL = "demo-model"


def _admin_key(state_dir: Path) -> tuple[str, bool]:
    """The bootstrap admin key of this data directory, and whether it was just created.

    Created once and kept private (mode 0600); it is printed only on the start that creates it.
    """
    path = state_dir / "admin-key"
    if path.exists():
        return path.read_text().strip(), False
    plaintext = generate()[0]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(plaintext + "\n")
    return plaintext, True


# What `up` keeps in its data directory (the broker keeps its log in kafka/); only these are tightened,
# so a data directory that holds other files (`--data-dir .`) keeps their modes.
_OWN_FILES = ("relaygate.db", "relaygate.db-wal", "relaygate.db-shm", "relaygate.db-journal", "admin-key")
_OWN_DIRS = ("logs", "spool", "kafka", "tls")


def _private(state_dir: Path) -> None:
    """Make what ``up`` keeps readable by this user only (written by an earlier version, or before the
    umask was set)."""
    for path in [state_dir / name for name in (*_OWN_FILES, SECRETS_FILE)]:
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & 0o700)
    for top in (state_dir / name for name in _OWN_DIRS):
        if not top.is_dir() or top.is_symlink():
            continue
        top.chmod(0o700)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(root, name)
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode & 0o700)


def _secrets(state_dir: Path) -> StackSecrets:
    """This data directory's secrets, generated on its first start.

    A directory that has an admin key but no secrets file was made by a version that used the
    published development pepper: its key hashes cannot be carried over to a private one.
    """
    path = state_dir / SECRETS_FILE
    if (state_dir / "admin-key").exists() and not path.exists():
        raise SecretsFileError(
            f"{state_dir} was created with the published development secrets, which are no longer "
            "used; its keys cannot be verified with private ones. Move the directory away (or delete "
            "it) and run `relaygate up` again."
        )
    return load_or_create(path)[0]


def _start_fake_upstream(log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.fake_upstream",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--latency-ms",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=(log_dir / "fake_upstream.log").open("ab"),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if "http://" not in line:
        process.kill()
        raise RuntimeError(f"fake upstream did not start: {line!r}")
    url = line[line.index("http://") :].strip()
    # Keep reading so a full pipe can never block the server.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, url


def admin_token(relay_url: str, admin_key: str) -> str:
    """Exchange an admin key for a short-lived admin token."""
    response = httpx.post(
        f"{relay_url}/admin/v1/tokens", headers={"authorization": f"Bearer {admin_key}"}, timeout=10
    )
    if response.status_code != 201:
        raise RuntimeError(f"could not obtain an admin token: {response.text}")
    return str(response.json()["token"])


def _setup_demo(relay_url: str, admin_key: str, upstream_url: str) -> str:
    """Register the fake upstream, price its model, and create a funded demo key; returns the key."""
    token = admin_token(relay_url, admin_key)
    with httpx.Client(base_url=relay_url, headers={"authorization": f"Bearer {token}"}, timeout=10) as client:

        def ok(response: httpx.Response) -> dict[str, object]:
            if response.is_error:
                raise RuntimeError(f"{response.request.method} {response.request.url}: {response.text}")
            body: dict[str, object] = response.json()
            return body

        ok(
            client.post(
                "/admin/v1/channels",
                json={
                    "name": "demo-upstream",
                    "base_url": f"{upstream_url}/v1",
                    "models": [DEMO_MODEL, "gpt-4o-mini"],
                    "priority": 0,
                    "weight": 1,
                    "enabled": True,
                },
            )
        )
        for model in (DEMO_MODEL, "gpt-4o-mini"):
            ok(
                client.put(
                    f"/admin/v1/prices/{model}",
                    json={
                        "input_per_mtok": 150_000,
                        "output_per_mtok": 600_000,
                        "default_max_output_tokens": 1024,
                    },
                )
            )
        user = ok(client.post("/admin/v1/users", json={"name": "demo"}))
        ok(
            client.post(
                f"/admin/v1/users/{user['user_id']}/topups",
                json={
                    "amount_micros": 10_000_000,
                    "reason": "demo credit",
                    "idempotency_key": f"demo-{user['user_id']}",
                },
            )
        )
        key = ok(client.post("/admin/v1/keys", json={"user_id": user["user_id"], "name": "demo"}))
        return str(key["api_key"])


def cmd_up(args: argparse.Namespace) -> int:
    # Before anything is written: the database, its WAL, the spool, logs and secrets inherit it.
    os.umask(0o077)
    state_dir = Path(args.data_dir).resolve()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(state_dir)
    try:
        secrets = _secrets(state_dir)
    except SecretsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    env = {
        "RELAYGATE_DATABASE_URL": os.environ.get(
            "RELAYGATE_DATABASE_URL", f"sqlite+aiosqlite:///{state_dir / 'relaygate.db'}"
        ),
        "RELAYGATE_KAFKA_BOOTSTRAP": os.environ.get("RELAYGATE_KAFKA_BOOTSTRAP", ""),
        "RELAYGATE_LOG_FORMAT": os.environ.get("RELAYGATE_LOG_FORMAT", "text"),
        "RELAYGATE_EVENT_SPOOL_DIR": os.environ.get("RELAYGATE_EVENT_SPOOL_DIR", str(state_dir / "spool")),
    }
    if port_accepts(args.port):
        print(f"port {args.port} is already in use; pick another with --port", file=sys.stderr)
        return 2
    asyncio.run(upgrade(env["RELAYGATE_DATABASE_URL"]))
    admin_key, new_admin_key = _admin_key(state_dir)
    stack = LocalStack(
        env=env,
        log_dir=state_dir / "logs",
        relay_port=args.port,
        extra_env={"auth": {"RELAYGATE_BOOTSTRAP_ADMIN_KEY": admin_key}},
        secrets=secrets,
    )
    upstream: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack.start()
        internal = ", ".join(
            f"{name} 127.0.0.1:{stack.port_of(name)}" for name in ("auth", "quota", "logger")
        )
        lines = [
            f"relaygate is up in {time.monotonic() - started:.1f}s",
            f"  relay:      {stack.relay_url}/v1   (OpenAI-compatible base URL)",
            f"  relay gRPC: {stack.relay_grpc_address}   (relaygate.relay.v1.InferenceService; TLS as "
            f"relay.relaygate.internal under {state_dir / 'tls' / 'ca.crt'}; see README)",
            f"  admin key:  {admin_key}   (shown once; kept in {state_dir / 'admin-key'})"
            if new_admin_key
            else f"  admin key:  in {state_dir / 'admin-key'}",
            f"  logs:       {stack.log_dir}",
            f"  internal:   {internal} (gRPC, mutual TLS; certificates in {state_dir / 'tls'})",
        ]
        if args.demo:
            upstream, upstream_url = _start_fake_upstream(stack.log_dir)
            demo_key = _setup_demo(stack.relay_url, admin_key, upstream_url)
            lines += [
                f"  demo key:   {demo_key}   (10.00 credit, model '{DEMO_MODEL}')",
                "",
                "try it:",
                f"  curl {stack.relay_url}/v1/chat/completions -H 'authorization: Bearer {demo_key}' \\",
                f'    -H \'content-type: application/json\' -d \'{{"model": "{DEMO_MODEL}", '
                '"messages": [{"role": "user", "content": "hello"}]}\'',
            ]
        print("\n".join(lines), flush=True)
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            crashed = stack.crashed()
            if crashed:
                print(f"stopping: {', '.join(crashed)} exited; see {stack.log_dir}", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping...", flush=True)
        if upstream is not None:
            upstream.terminate()
            upstream.wait(10)
        stack.stop()
        print("stopped", flush=True)


def cmd_migrate(_args: argparse.Namespace) -> int:
    asyncio.run(upgrade(DatabaseSettings().database_url))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relaygate", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run all four services locally on the embedded default")
    up.add_argument("--demo", action="store_true", help="also start and register the fake upstream")
    up.add_argument("--port", type=int, default=8080, help="relay HTTP port (default 8080)")
    up.add_argument(
        "--data-dir", default=".relaygate", help="SQLite database, admin key, secrets, spool and logs"
    )
    up.set_defaults(func=cmd_up)
    migrate = commands.add_parser("migrate", help="upgrade RELAYGATE_DATABASE_URL to the newest schema")
    migrate.set_defaults(func=cmd_migrate)
    admin_client.add_parser(commands)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
