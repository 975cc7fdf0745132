"""Property-based fuzzing of every route the relay serves, over raw sockets against a running stack.

For every generated request: the answer is never a 5xx; every 4xx is OpenAI's error object; the funded
user's balance and holds do not move; the fake upstream receives nothing. Routes are enumerated from
the relay app itself, so a new route is fuzzed without anyone listing it here.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.relay.edge.http.app import create_app
from services.relay.edge.http.front import ServedRoute
from services.relay.settings import RelaySettings
from tests.fuzz import strategies as hostile
from tests.fuzz.conftest import FUNDS, Target, examples
from tests.fuzz.wire import Reply, exchange, request_bytes

ROUTES = create_app(RelaySettings()).routes()
OPENAI_POSTS = [r for r in ROUTES if r.method == "POST" and r.path.startswith("/v1/")]
OPENAI_READS = [r for r in ROUTES if r.method == "GET" and not r.path.startswith("/admin/")]
ADMIN = [r for r in ROUTES if r.path.startswith("/admin/")]
METHODS = [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"HEAD", b"PROPFIND", b"CONNECT"]
BAD_METHODS = [b"FOO", b"get", b"G\x00T", b"", b"POST POST", b"\xff"]


def test_every_route_is_covered() -> None:
    """The suite knows how to poison a body for every OpenAI POST route (a new one fails here)."""
    assert {r.path for r in OPENAI_POSTS} == set(hostile.ROUTE_POISONS)
    assert ADMIN, "no admin routes found"


def check(target: Target, request: bytes, *, method: bytes = b"") -> Reply:
    """Send ``request`` and assert the properties every answer must have."""
    calls_before = target.deployment.upstream.stats()["requests_total"]
    reply = exchange(target.port, request, head=method == b"HEAD")
    assert reply.status < 500, (reply.status, reply.body[:500])
    if 400 <= reply.status < 500 and method != b"HEAD":
        assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
        try:
            body = orjson.loads(reply.body)
            error = body["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise AssertionError(f"not an error object: {reply}") from None
        if _anthropic_route(request, method):
            # A POST to the Messages API: Anthropic's error shape, whether the route answered or the
            # HTTP protocol layer refused its head first.
            assert body["type"] == "error" and set(error) == {"type", "message"}, body
        else:
            assert set(error) == {"message", "type", "param", "code"}, error
            assert isinstance(error["code"], str)
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
    assert target.deployment.upstream.stats()["requests_total"] == calls_before
    assert target.balance() == (FUNDS, 0)
    return reply


def _anthropic_route(request: bytes, method: bytes) -> bool:
    """Whether ``request`` is a POST that the Messages route answers (in Anthropic's error shape)."""
    parts = request.split(b"\r\n", 1)[0].split(b" ")
    return (
        len(parts) == 3
        and parts[0] == b"POST"
        and method in (b"", b"POST")
        and parts[1].split(b"?", 1)[0] in (b"/v1/messages", b"/v1/messages/count_tokens")
    )


def target_of(route: ServedRoute, segment: bytes, query: bytes) -> bytes:
    path = hostile.fill(route.path, segment)
    return path + (b"?" + query if query else b"")


@settings(max_examples=examples(200))
@given(data=st.data())
def test_hostile_bodies_on_openai_routes(target: Target, data: Any) -> None:
    route = data.draw(st.sampled_from(OPENAI_POSTS), label="route")
    body = data.draw(hostile.poisoned_bodies(route.path), label="body")
    headers = [
        *data.draw(hostile.credentials(target.key), label="credentials"),
        *data.draw(hostile.content_types, label="content type"),
        *data.draw(st.one_of(st.just([]), hostile.junk_headers), label="headers"),
    ]
    query = data.draw(st.one_of(st.just(b""), hostile.query_strings), label="query")
    reply = check(target, request_bytes(b"POST", target_of(route, b"", query), headers, body))
    assert reply.status >= 400, reply.body[:300]


@settings(max_examples=examples(60))
@given(data=st.data())
def test_hostile_heads_on_openai_reads(target: Target, data: Any) -> None:
    route = data.draw(st.sampled_from(OPENAI_READS), label="route")
    segment = data.draw(hostile.path_segments, label="path segment")
    query = data.draw(hostile.query_strings, label="query")
    headers = [
        *data.draw(hostile.credentials(target.key), label="credentials"),
        *data.draw(hostile.junk_headers, label="headers"),
    ]
    body = data.draw(st.one_of(st.none(), hostile.raw_values), label="body")
    check(target, request_bytes(b"GET", target_of(route, segment, query), headers, body))


def admin_credentials(target: Target, route: ServedRoute) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Tokens for reads; writes get the write token only with bodies that cannot parse (see below)."""
    token = target.read_token if route.method == "GET" else target.write_token
    return st.one_of(
        st.just([(b"authorization", b"Bearer " + token.encode())]),
        st.just([(b"authorization", b"Bearer " + token.encode()[:-2])]),
        hostile.credentials(target.key),
    )


@st.composite
def admin_bodies(draw: st.DrawFn) -> bytes | None:
    """Bodies no admin write may accept: not a JSON object, too deep, or with a field no protobuf
    message has (the admin API parses bodies strictly), so a write token never changes anything."""
    return draw(
        st.one_of(
            st.none(),
            hostile.WHOLE_BODY_POISONS,
            st.tuples(hostile.field_names, hostile.deep_values()).map(lambda f: hostile.obj([f])),
            st.lists(st.tuples(hostile.field_names, hostile.raw_values), max_size=4).map(
                lambda fields: hostile.obj([*fields, ("__not_a_field__", b"1")])
            ),
        )
    )


@settings(max_examples=examples(200))
@given(data=st.data())
def test_hostile_requests_on_admin_routes(target: Target, data: Any) -> None:
    route = data.draw(st.sampled_from(ADMIN), label="route")
    segment = data.draw(
        hostile.path_segments.filter(lambda s: s.decode("latin-1") not in target.known_ids), label="path"
    )
    query = data.draw(
        st.one_of(
            hostile.query_strings,
            st.lists(
                st.tuples(st.sampled_from(route.query or ("limit",)), st.sampled_from(hostile.QUERY_VALUES)),
                min_size=1,
                max_size=3,
            ).map(lambda pairs: b"&".join(n.encode() + b"=" + v for n, v in pairs)),
        ),
        label="query",
    )
    headers = [
        *data.draw(admin_credentials(target, route), label="credentials"),
        *data.draw(hostile.content_types, label="content type"),
        *data.draw(st.one_of(st.just([]), hostile.junk_headers), label="headers"),
    ]
    body = data.draw(admin_bodies(), label="body")
    check(target, request_bytes(route.method.encode(), target_of(route, segment, query), headers, body))


@settings(max_examples=examples(100))
@given(data=st.data())
def test_hostile_methods_and_request_lines(target: Target, data: Any) -> None:
    route = data.draw(st.sampled_from(ROUTES), label="route")
    method = data.draw(st.sampled_from(METHODS + BAD_METHODS), label="method")
    # A write on an admin route goes without credentials: only what the edge does is under test here.
    credentials = (
        [] if route.path.startswith("/admin/") else [(b"authorization", b"Bearer " + target.key.encode())]
    )
    path = data.draw(
        st.one_of(
            st.just(hostile.fill(route.path, b"x")),
            st.just(hostile.fill(route.path, b"x") + b"/"),
            st.sampled_from(
                [b"*", b"http://evil.example/v1/models", b"//v1//models", b"/v1/%", b"/\x00", b"/a b"]
            ),
            st.binary(min_size=1, max_size=40).map(
                lambda p: b"/" + p.replace(b"\r", b"").replace(b"\n", b"")
            ),
        ),
        label="path",
    )
    poisons = route.path if route.path in hostile.ROUTE_POISONS else "/v1/chat/completions"
    body = data.draw(st.one_of(st.none(), hostile.poisoned_bodies(poisons)), label="body")
    if method in (b"POST", b"PUT", b"PATCH") and path.startswith(b"/v1/") and body is None:
        body = b"{"
    check(target, request_bytes(method, path, credentials, body), method=method)
