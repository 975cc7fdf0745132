"""Hostile input at the relay's edge: deep nesting, out-of-range integers, oversized keys and headers,
unknown methods, slow clients and too many streams per key. Every one of them is an OpenAI-shaped 4xx
that costs nothing and reaches no upstream; none is a 5xx."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.stack import MODEL, Deployment, balance, fund_user, settled_balance

pytestmark = pytest.mark.shared_stack

FUNDS = 1_000_000
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
STREAMS_PER_KEY = 2
INT64_OVERFLOW = 2**63


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    return {
        "RELAYGATE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "RELAYGATE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "RELAYGATE_MAX_STREAMS_PER_KEY": str(STREAMS_PER_KEY),
        # These tests count holds after each request: exact reservations only (tests/e2e/test_leases.py
        # covers leases, whose hold stays until the key goes quiet).
        "RELAYGATE_CREDIT_LEASES": "false",
    }


@pytest.fixture(scope="module")
def account(deployment: Deployment) -> tuple[str, str]:
    return fund_user(deployment, FUNDS)


@pytest.fixture(scope="module")
def admin(deployment: Deployment) -> Iterator[httpx.Client]:
    with deployment.admin() as client:
        yield client


def nest(depth: int, leaf: str = '"x"') -> str:
    """A marker that :func:`encode` replaces with ``depth`` nested arrays around ``leaf`` (JSON); the
    encoders themselves refuse such depths."""
    return f"<nest {depth} {leaf}>"


def encode(body: object) -> bytes:
    def expand(match: re.Match[bytes]) -> bytes:
        depth = int(match.group(1))
        leaf = orjson.loads(b'"' + match.group(2) + b'"')
        assert isinstance(leaf, str)
        return b"[" * depth + leaf.encode() + b"]" * depth

    return re.sub(rb'"<nest (\d+) ((?:[^"\\]|\\.)*)>"', expand, orjson.dumps(body))


def user(content: object = "x") -> dict[str, Any]:
    return {"role": "user", "content": content}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [user()], **fields}


def tool(parameters: object) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def verifications_by_auth(deployment: Deployment) -> float:
    text = httpx.get(f"{deployment.relay_url}/metrics", timeout=10).text
    pattern = r'^relaygate_auth_verify_total\{[^}]*source="auth"[^}]*\} ([0-9.e+]+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


BODIES = [
    # (id, path, body, param)
    ("messages-300-deep", "chat/completions", chat(messages=[user(nest(300))]), "messages"),
    ("messages-1000-deep", "chat/completions", chat(messages=[user(nest(1000))]), "messages"),
    ("tools-300-deep", "chat/completions", chat(tools=[tool(nest(300, "{}"))]), "tools"),
    ("stream-field-300-deep", "chat/completions", chat(stream=True, metadata=nest(300)), "metadata"),
    ("input-300-deep", "embeddings", {"model": MODEL, "input": nest(300)}, "input"),
    ("prompt-1000-deep", "completions", {"model": MODEL, "prompt": nest(1000)}, "prompt"),
    ("max-tokens-int64", "chat/completions", chat(max_tokens=INT64_OVERFLOW), "max_tokens"),
    (
        "max-completion-tokens-int64",
        "chat/completions",
        chat(max_completion_tokens=INT64_OVERFLOW, stream=True),
        "max_completion_tokens",
    ),
    ("n-int64", "images/generations", {"model": MODEL, "prompt": "cat", "n": INT64_OVERFLOW}, "n"),
    ("n-above-128", "chat/completions", chat(n=129), "n"),
    ("too-many-messages", "chat/completions", chat(messages=[user()] * 5000), "messages"),
    ("too-many-tools", "chat/completions", chat(tools=[tool({})] * 200), "tools"),
    ("too-many-inputs", "embeddings", {"model": MODEL, "input": ["x"] * 5000}, "input"),
]


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in BODIES], ids=[c[0] for c in BODIES])
def test_hostile_bodies_are_400_before_any_cost(
    deployment: Deployment, account: tuple[str, str], path: str, body: object, param: str
) -> None:
    user_id, key = account
    calls_before = deployment.upstream.stats()["requests_total"]
    response = httpx.post(
        f"{deployment.relay_url}/v1/{path}",
        content=encode(body),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        timeout=10,
    )
    assert assert_openai_error(response, 400)["param"] == param
    assert deployment.upstream.stats()["requests_total"] == calls_before
    after = balance(deployment, user_id)
    assert (after["balance_micros"], after["reserved_micros"]) == (FUNDS, 0)


def test_a_legitimately_nested_tool_schema_passes(deployment: Deployment, account: tuple[str, str]) -> None:
    _, key = account
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"inner": schema}}
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json=chat(tools=[tool(schema)], max_tokens=4),
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def test_deep_nesting_is_refused_before_authentication(deployment: Deployment) -> None:
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        content=encode(chat(messages=[user(nest(1000))])),
        headers={"authorization": "Bearer rg-000000000000-" + "0" * 32},
        timeout=10,
    )
    assert_openai_error(response, 400)


def test_an_overlong_key_is_401_without_asking_auth(deployment: Deployment) -> None:
    asked = verifications_by_auth(deployment)
    for path in ("/v1/chat/completions", "/v1/models"):
        response = httpx.request(
            "POST" if path.endswith("completions") else "GET",
            f"{deployment.relay_url}{path}",
            json=chat(),
            headers={"authorization": "Bearer rg-" + "a" * 4000},
            timeout=10,
        )
        assert_openai_error(response, 401, "invalid_api_key")
    assert verifications_by_auth(deployment) == asked


def test_a_multi_megabyte_key_is_refused_as_headers_too_large(deployment: Deployment) -> None:
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json=chat(),
        headers={"authorization": "Bearer rg-" + "a" * 3_000_000},
        timeout=10,
    )
    assert_openai_error(response, 431, "headers_too_large")


def test_too_many_headers_are_refused(deployment: Deployment) -> None:
    headers = [(f"x-filler-{i}", "1") for i in range(300)]
    response = httpx.get(f"{deployment.relay_url}/v1/models", headers=headers, timeout=10)
    assert_openai_error(response, 431, "headers_too_large")


def test_refusals_before_routing_speak_anthropic_on_the_messages_route(deployment: Deployment) -> None:
    headers = [(f"x-filler-{i}", "1") for i in range(300)]
    response = httpx.post(f"{deployment.relay_url}/v1/messages", headers=headers, timeout=10)
    assert response.status_code == 431
    answer = response.json()
    assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]


@pytest.mark.parametrize("path", [b"/v1/messages", b"/v1/messages/count_tokens"])
def test_a_target_the_parser_refuses_is_answered_in_anthropics_shape_on_the_messages_route(
    deployment: Deployment, path: bytes
) -> None:
    """A raw non-ASCII byte in the query stops the HTTP parser inside the target, before the server
    knows the path: the refusal still reads the request line."""
    port = int(deployment.relay_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST " + path + b"?limit=\xe2\x82\xac HTTP/1.1\r\nhost: relay\r\ncontent-length: 0\r\n\r\n"
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), received
    answer = orjson.loads(body)
    assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}, answer
    assert "not valid HTTP/1.1" in answer["error"]["message"]


def test_a_pipelined_request_s_wait_behind_the_one_before_counts(
    deployment: Deployment, account: tuple[str, str]
) -> None:
    """A request's clock starts when its head is in, not when its handler runs: here the second of two
    pipelined requests waits for the first one's slow answer, and its overhead says so."""
    _, key = account
    body = orjson.dumps(chat())
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(deployment.relay_url.rsplit(":", 1)[1])
    deployment.upstream.configure(latency_ms=600)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body + head + body)
            received = b""
            while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
    finally:
        deployment.upstream.reset()
    overheads = [float(v) for v in re.findall(rb"x-relaygate-overhead-ms: ([0-9.]+)", received)]
    assert len(overheads) == 2, received
    assert overheads[0] < 500 <= overheads[1], overheads


ADMIN_QUERIES = [
    ("/admin/v1/users", {"limit": str(INT64_OVERFLOW)}),
    ("/admin/v1/keys", {"limit": str(2**31)}),
    ("/admin/v1/users/usr_x/balance", {"min_lsn": str(INT64_OVERFLOW)}),
    ("/admin/v1/users/usr_x/reservations", {"limit": str(INT64_OVERFLOW)}),
    ("/admin/v1/logs", {"since_ms": str(INT64_OVERFLOW)}),
    ("/admin/v1/logs", {"until_ms": str(-(2**63) - 1)}),
    ("/admin/v1/logs", {"status_code": str(2**40)}),
    ("/admin/v1/usage", {"until_ms": "9" * 5000}),
    ("/admin/v1/usage", {"limit": str(INT64_OVERFLOW)}),
]


@pytest.mark.parametrize(("path", "params"), ADMIN_QUERIES)
def test_out_of_range_admin_query_parameters_are_400(
    admin: httpx.Client, path: str, params: dict[str, str]
) -> None:
    error = assert_openai_error(admin.get(path, params=params), 400)
    assert error["param"] == next(iter(params))


def test_an_admin_path_with_a_trailing_slash_is_404_not_a_redirect(deployment: Deployment) -> None:
    response = httpx.get(
        f"{deployment.relay_url}/admin/v1/users/", headers={"host": "evil.example"}, timeout=10
    )
    assert "location" not in response.headers
    assert_openai_error(response, 404, "not_found")


def raw_exchange(deployment: Deployment, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``request`` as is and read until the relay closes the connection."""
    port = int(deployment.relay_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def parse_raw(received: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


@pytest.mark.parametrize("method", [b"FOO", b"get", b"BREW"])
def test_an_unknown_method_is_a_json_405(deployment: Deployment, method: bytes) -> None:
    received = raw_exchange(deployment, method + b" /v1/models HTTP/1.1\r\nhost: relay\r\n\r\n")
    status, headers, body = parse_raw(received)
    assert status == 405
    assert headers["allow"]
    assert headers["content-type"] == "application/json"
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_an_unrouted_method_on_a_model_path_is_405(deployment: Deployment) -> None:
    response = httpx.post(f"{deployment.relay_url}/v1/models/{MODEL}", timeout=10)
    assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


def trickle(
    deployment: Deployment, head: bytes, drip: bytes, *, interval_s: float = 0.25
) -> tuple[float, bytes]:
    """Send ``head``, then ``drip`` one byte at a time; seconds until the relay closed, and what it sent."""
    port = int(deployment.relay_url.rsplit(":", 1)[1])
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sock.settimeout(interval_s)
        for byte in drip:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            received += chunk
            if not chunk:
                break
        else:
            pytest.fail("the relay kept reading a trickling client to the end")
        return time.monotonic() - started, received


def test_a_client_trickling_its_headers_is_cut_off(deployment: Deployment) -> None:
    elapsed, received = trickle(deployment, b"GET /v1/models HTTP/1.1\r\n", b"x-slow: " + b"a" * 40)
    assert elapsed < HEADER_TIMEOUT_S + 5
    if received:
        assert parse_raw(received)[0] == 408


def test_a_client_trickling_its_body_is_cut_off(deployment: Deployment, account: tuple[str, str]) -> None:
    user_id, key = account
    calls_before = deployment.upstream.stats()["requests_total"]
    body = orjson.dumps(chat()) + b" " * 40
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    elapsed, received = trickle(deployment, head, body)
    assert elapsed < BODY_TIMEOUT_S + 5
    status, _, error = parse_raw(received)
    assert status == 408
    assert orjson.loads(error)["error"]["code"] == "request_timeout"
    assert deployment.upstream.stats()["requests_total"] == calls_before
    assert balance(deployment, user_id)["reserved_micros"] == 0


def test_an_idle_connection_is_closed(deployment: Deployment) -> None:
    port = int(deployment.relay_url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT_S + 5) as sock:
        while sock.recv(65536):
            pass
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 5


def test_streams_per_key_are_capped(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, FUNDS)
    deployment.upstream.configure(chunks=4, chunk_interval_ms=500)
    started = threading.Barrier(STREAMS_PER_KEY + 1)
    statuses: list[int] = []

    def hold_stream() -> None:
        with httpx.stream(
            "POST",
            f"{deployment.relay_url}/v1/chat/completions",
            json=chat(stream=True),
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        ) as response:
            statuses.append(response.status_code)
            started.wait()
            for _ in response.iter_bytes():
                pass

    holders = [threading.Thread(target=hold_stream) for _ in range(STREAMS_PER_KEY)]
    try:
        for holder in holders:
            holder.start()
        started.wait(timeout=20)
        refused = httpx.post(
            f"{deployment.relay_url}/v1/chat/completions",
            json=chat(stream=True),
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert_openai_error(refused, 429, "concurrency_limit_exceeded")
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        for holder in holders:
            holder.join(timeout=30)
        deployment.upstream.reset()
    assert statuses == [200] * STREAMS_PER_KEY
    after = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json=chat(stream=True, max_tokens=2),
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert after.status_code == 200, after.text
    assert settled_balance(deployment, user_id)["reserved_micros"] == 0


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/v1/keys/%00/revoke", None),
        ("POST", "/admin/v1/keys/key_%00/rotate", None),
        ("GET", "/admin/v1/users/%00/balance", None),
        ("GET", "/admin/v1/keys?user_id=usr_%00", None),
        ("POST", "/admin/v1/users", {"name": "a\u0000b"}),
        ("PATCH", "/admin/v1/keys/key_x", {"metadata": {"k\u0000": "v"}}),
    ],
)
def test_nul_characters_never_reach_the_database(
    admin: httpx.Client, method: str, path: str, body: object
) -> None:
    """PostgreSQL text cannot hold U+0000: such ids and names are refused at the edge (they were 500s)."""
    response = admin.request(method, path, content=None if body is None else orjson.dumps(body))
    assert_openai_error(response, 400)


def test_a_model_name_with_control_characters_is_refused(
    deployment: Deployment, account: tuple[str, str]
) -> None:
    _, key = account
    response = httpx.post(
        f"{deployment.relay_url}/v1/chat/completions",
        json=chat(model="gpt\u0000e2e"),
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert assert_openai_error(response, 400)["param"] == "model"


@pytest.mark.parametrize("target", [b"http://", b"http://[::1/v1/models", b"http://relay:99999999/v1/models"])
def test_a_request_target_that_does_not_parse_is_a_json_400(deployment: Deployment, target: bytes) -> None:
    received = raw_exchange(deployment, b"GET " + target + b" HTTP/1.1\r\nhost: relay\r\n\r\n")
    status, headers, body = parse_raw(received)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == "invalid_request"


def test_an_admin_body_cut_off_for_slowness_is_not_a_crash(
    deployment: Deployment, admin: httpx.Client
) -> None:
    token = str(admin.headers["authorization"]).removeprefix("Bearer ")
    body = orjson.dumps({"name": "slow"}) + b" " * 40
    head = (
        f"POST /admin/v1/users HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer {token}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    log = deployment.relay_log
    logged_before = log.read_text()
    _, received = trickle(deployment, head, body)
    assert parse_raw(received)[0] == 408
    time.sleep(0.5)
    assert "unhandled error" not in log.read_text()[len(logged_before) :]


def test_a_kept_alive_connection_trickling_its_next_head_is_cut_off(deployment: Deployment) -> None:
    port = int(deployment.relay_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n")
        first = sock.recv(65536)
        assert parse_raw(first)[0] == 200
        started = time.monotonic()
        sock.settimeout(0.25)
        received = b""
        for byte in b"GET /healthz HTTP/1.1\r\nx-slow: " + b"a" * 40:
            try:
                sock.sendall(bytes([byte]))
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            received += chunk
            if not chunk:
                break
        else:
            pytest.fail("the relay kept reading a trickling client to the end")
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 5
    assert parse_raw(received)[0] == 408


def test_a_stream_the_client_abandons_gives_its_slot_back(deployment: Deployment) -> None:
    _, key = fund_user(deployment, FUNDS)
    headers = {"authorization": f"Bearer {key}"}
    url = f"{deployment.relay_url}/v1/chat/completions"
    deployment.upstream.configure(chunks=6, chunk_interval_ms=400)
    try:
        for _ in range(STREAMS_PER_KEY):
            with httpx.stream("POST", url, json=chat(stream=True), headers=headers, timeout=30) as response:
                assert response.status_code == 200
                next(response.iter_bytes())
            # Leaving the block closes the connection in the middle of the stream.
        time.sleep(0.5)
        opened = threading.Barrier(STREAMS_PER_KEY)
        statuses: list[int] = []

        def stream_once() -> None:
            with httpx.stream("POST", url, json=chat(stream=True), headers=headers, timeout=30) as response:
                statuses.append(response.status_code)
                opened.wait(timeout=20)
                response.read()

        holders = [threading.Thread(target=stream_once) for _ in range(STREAMS_PER_KEY)]
        for holder in holders:
            holder.start()
        for holder in holders:
            holder.join(timeout=30)
    finally:
        deployment.upstream.reset()
    assert statuses == [200] * STREAMS_PER_KEY
