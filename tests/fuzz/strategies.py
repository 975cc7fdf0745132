"""Hypothesis strategies for hostile requests.

JSON is generated as raw bytes rather than Python values: no encoder would produce a thousand levels of
nesting, integers past 64 bits, lone surrogate escapes or invalid UTF-8, and those are what the edge
must survive. Every body for a POST to an OpenAI route carries one *poison*: a field or a whole-body
defect the relay must refuse. Whatever else the body holds (valid fields included), the request may
therefore never reach the upstream or the balance.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from hypothesis import strategies as st

from tests.e2e.stack import MODEL

Field = tuple[str, bytes]

# --- raw JSON ---------------------------------------------------------------------------------------

NUMBER_LITERALS = [
    b"0",
    b"-1",
    b"1",
    b"128",
    b"129",
    b"2147483647",
    b"2147483648",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775808",
    b"-9223372036854775809",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1" + b"0" * 400,
    b"1e999",
    b"-1e999",
    b"1e-999",
    b"-0",
    b"0.5",
    b"1.0",
    b"1E+2",
]
BAD_STRINGS = [
    b'"\\ud800"',  # lone surrogate escapes
    b'"x\\udfff"',
    b'"\xff\xfe"',  # invalid UTF-8
    b'"\xc3\x28"',
    b'"\xed\xa0\x80"',  # a UTF-8-encoded surrogate
    b'"a\x00b"',  # a raw control byte inside a string
    b'"\\x41"',  # an escape JSON does not have
]
texts = st.text(max_size=30)
raw_numbers = st.one_of(
    st.sampled_from(NUMBER_LITERALS),
    st.integers(-(2**70), 2**70).map(lambda i: str(i).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(orjson.dumps),
)
raw_scalars = st.one_of(
    raw_numbers,
    texts.map(orjson.dumps),
    st.sampled_from([b"true", b"false", b"null", b'""', b'"\\u0000"']),
)


def array(items: list[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


def obj(fields: list[Field]) -> bytes:
    return b"{" + b",".join(orjson.dumps(name) + b":" + value for name, value in fields) + b"}"


raw_values = st.recursive(
    raw_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(array),
        st.lists(st.tuples(texts, children), max_size=4).map(obj),
    ),
    max_leaves=12,
)


@st.composite
def deep_values(draw: st.DrawFn, *, arrays_only: bool = False) -> bytes:
    """Arrays and objects nested past the relay's limit (64), up to past orjson's (1,024)."""
    depth = draw(st.integers(65, 1100))
    kind = draw(st.sampled_from(["array", "mixed"] if arrays_only else ["array", "object", "mixed"]))
    leaf = draw(raw_scalars)
    if kind == "array":
        return b"[" * depth + leaf + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + leaf + b"}" * depth
    return b'[{"a":' * (depth // 2 + 1) + leaf + b"}]" * (depth // 2 + 1)


# --- bodies -----------------------------------------------------------------------------------------

KNOWN_FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "tools",
    "functions",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "metadata",
    "user",
    "size",
]
field_names = st.one_of(st.sampled_from(KNOWN_FIELDS), texts)
MESSAGE = b'{"role":"user","content":"x"}'


def not_(*allowed: bytes) -> Callable[[bytes], bool]:
    return lambda value: value not in allowed


def not_a_positive_int(maximum: int) -> st.SearchStrategy[bytes]:
    """JSON that is not null and not an integer from 1 to ``maximum``."""

    def in_range(value: bytes) -> bool:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return False
        return parsed is None or (type(parsed) is int and 1 <= parsed <= maximum)

    return st.one_of(st.sampled_from(NUMBER_LITERALS), raw_values).filter(lambda v: not in_range(v))


not_a_bool = raw_values.filter(not_(b"true", b"false", b"null"))
not_a_number = raw_values.filter(lambda v: v != b"null" and type(_loads_or_none(v)) not in (int, float))
not_an_object = raw_values.filter(lambda v: v != b"null" and not v.startswith(b"{"))


def _loads_or_none(value: bytes) -> object:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return "invalid"


# Defects every format refuses, the inbound formats (Anthropic Messages, Responses) included.
NEUTRAL_POISONS: list[st.SearchStrategy[Field]] = [
    st.tuples(field_names, deep_values()),
    # A field the relay does not read would be forwarded untouched: only the depth check stops it.
    st.tuples(texts.filter(lambda name: name not in KNOWN_FIELDS), deep_values()),
    st.tuples(field_names, st.sampled_from(BAD_STRINGS)),
    st.tuples(st.just("model"), raw_values.filter(lambda v: not (v.startswith(b'"') and len(v) > 2))),
    st.tuples(st.just("model"), st.integers(201, 5000).map(lambda n: b'"' + b"m" * n + b'"')),
    st.tuples(st.sampled_from(["temperature", "top_p"]), not_a_number),
    st.tuples(st.just("stream"), not_a_bool),
]
COMMON_POISONS: list[st.SearchStrategy[Field]] = [
    *NEUTRAL_POISONS,
    st.tuples(st.sampled_from(["max_tokens", "max_completion_tokens"]), not_a_positive_int(2**31 - 1)),
    st.tuples(st.just("n"), not_a_positive_int(128)),
    st.tuples(st.just("stream_options"), not_an_object),
]
ROUTE_POISONS: dict[str, list[st.SearchStrategy[Field]]] = {
    "/v1/chat/completions": [
        deep_values(arrays_only=True).map(
            lambda deep: ("messages", array([obj([("role", b'"user"'), ("content", deep)])]))
        ),
        deep_values().map(lambda deep: ("tools", array([deep]))),
        st.tuples(
            st.just("messages"),
            st.one_of(
                st.sampled_from([b"null", b"[]", b'"hi"', b"[1]", b'[{"content":"x"}]', b'[{"role":1}]']),
                st.just(b'[{"role":"user","content":5}]'),
                st.just(array([MESSAGE] * 2049)),
                raw_values.filter(lambda v: not v.startswith(b"[")),
            ),
        ),
        st.tuples(
            st.sampled_from(["tools", "functions"]),
            st.one_of(
                raw_values.filter(lambda v: v != b"null" and not v.startswith(b"[")),
                st.just(array([b"{}"] * 129)),
            ),
        ),
    ],
    "/v1/completions": [
        st.tuples(st.just("prompt"), deep_values(arrays_only=True)),
        st.tuples(
            st.just("prompt"),
            st.one_of(
                st.sampled_from([b"null", b"[]", b"5", b"{}", b"true"]),
                st.just(array([b'"x"'] * 2049)),
            ),
        ),
    ],
    "/v1/embeddings": [
        st.tuples(st.just("input"), deep_values(arrays_only=True)),
        st.tuples(
            st.just("input"),
            st.one_of(
                st.sampled_from([b"null", b"[]", b"5", b"{}", b"false"]),
                st.just(array([b'"x"'] * 2049)),
            ),
        ),
        st.just(("stream", b"true")),
    ],
    "/v1/images/generations": [
        st.tuples(st.just("prompt"), st.sampled_from([b"null", b'""', b"5", b"[]", b'["cat"]'])),
        st.just(("stream", b"true")),
    ],
    # The inbound formats build the chat body from the fields they know, so an OpenAI-only field is
    # dropped rather than forwarded: their poisons are their own fields.
    "/v1/messages": [
        deep_values(arrays_only=True).map(
            lambda deep: ("messages", array([obj([("role", b'"user"'), ("content", deep)])]))
        ),
        st.tuples(
            st.just("messages"),
            st.one_of(
                st.sampled_from([b"null", b"[]", b'"hi"', b"[1]", b'[{"role":"system","content":"x"}]']),
                st.just(b'[{"role":"user","content":[{"type":"document"}]}]'),
                st.just(b'[{"role":"user","content":[{"type":"image","source":5}]}]'),
                st.just(array([MESSAGE] * 2049)),
            ),
        ),
        st.tuples(st.just("max_tokens"), not_a_positive_int(2**31 - 1)),
        st.tuples(st.just("system"), st.sampled_from([b"5", b"[1]", b'[{"type":"image"}]'])),
        st.tuples(
            st.just("tools"), st.sampled_from([b"5", b"[{}]", b'[{"type":"web_search_20250305","name":"w"}]'])
        ),
        st.tuples(st.just("tool_choice"), st.sampled_from([b"5", b'{"type":"sometimes"}', b'{"type":[]}'])),
        st.tuples(st.just("stop_sequences"), st.sampled_from([b'"x"', b"[1]"])),
    ],
    # Counting takes a message without its cap: the same poisons, less max_tokens.
    "/v1/messages/count_tokens": [
        deep_values(arrays_only=True).map(
            lambda deep: ("messages", array([obj([("role", b'"user"'), ("content", deep)])]))
        ),
        st.tuples(st.just("messages"), st.sampled_from([b"null", b"[]", b'"hi"', b'[{"role":"system"}]'])),
        st.tuples(st.just("system"), st.sampled_from([b"5", b"[1]", b'[{"type":"image"}]'])),
        st.tuples(st.just("tools"), st.sampled_from([b"5", b"[{}]"])),
        st.tuples(
            st.just("thinking"), st.sampled_from([b"5", b'{"type":"sometimes"}', b'{"type":"enabled"}'])
        ),
    ],
    "/v1/responses": [
        st.tuples(st.just("input"), deep_values(arrays_only=True)),
        st.tuples(
            st.just("input"),
            st.one_of(
                st.sampled_from(
                    [b"null", b"[]", b"5", b'[{"type":"item_reference","id":"x"}]', b'[{"role":[]}]']
                ),
                st.just(array([MESSAGE] * 2049)),
            ),
        ),
        st.tuples(st.sampled_from(["previous_response_id", "conversation"]), st.just(b'"x"')),
        st.tuples(st.sampled_from(["store", "background"]), st.just(b"true")),
        st.tuples(st.just("max_output_tokens"), not_a_positive_int(2**31 - 1)),
        st.tuples(st.just("tools"), st.sampled_from([b"5", b'[{"type":"web_search"}]'])),
    ],
}
STREAMING = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"})
# Served by converting to chat: only the format-neutral common poisons apply.
INBOUND_FORMATS = frozenset({"/v1/messages", "/v1/messages/count_tokens", "/v1/responses"})
WHOLE_BODY_POISONS = st.one_of(
    st.sampled_from([b"", b"[]", b"null", b"1", b'"text"', b"{", b'{"model":', b"\xff\xfe\xfd", b"{}}"]),
    st.binary(max_size=200).filter(lambda raw: _loads_or_none(raw) == "invalid"),
    raw_values.filter(lambda v: not v.startswith(b"{")),
)


def _text(value: str) -> bytes:
    return orjson.dumps(value)


messages = st.lists(
    st.builds(
        lambda role, content: obj([("role", _text(role)), ("content", _text(content))]),
        st.sampled_from(["system", "user", "assistant"]),
        texts,
    ),
    min_size=1,
    max_size=3,
).map(array)
prompts = st.one_of(
    texts.map(_text),
    st.lists(texts.map(_text), min_size=1, max_size=3).map(array),
    st.lists(st.integers(0, 100_000).map(lambda i: str(i).encode()), min_size=1, max_size=8).map(array),
)
# What each endpoint needs to be served; on top of it, the poison alone must get the body refused.
VALID_FIELDS: dict[str, st.SearchStrategy[list[Field]]] = {
    "/v1/chat/completions": st.tuples(st.just("messages"), messages).map(lambda f: [f]),
    "/v1/completions": st.tuples(st.just("prompt"), prompts).map(lambda f: [f]),
    "/v1/embeddings": st.tuples(st.just("input"), prompts).map(lambda f: [f]),
    "/v1/images/generations": st.tuples(st.just("prompt"), texts.filter(bool).map(_text)).map(lambda f: [f]),
    "/v1/messages": st.tuples(st.just("messages"), messages.filter(lambda m: b'"system"' not in m)).map(
        lambda f: [f, ("max_tokens", b"16")]
    ),
    "/v1/messages/count_tokens": st.tuples(
        st.just("messages"), messages.filter(lambda m: b'"system"' not in m)
    ).map(lambda f: [f]),
    "/v1/responses": st.tuples(st.just("input"), messages).map(lambda f: [f]),
}
optional_fields = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["max_tokens", "max_completion_tokens"]), st.integers(1, 64).map(orjson.dumps)
        ),
        st.tuples(st.sampled_from(["temperature", "top_p"]), st.floats(0, 1).map(orjson.dumps)),
        st.tuples(st.just("n"), st.integers(1, 2).map(orjson.dumps)),
        # Fields the relay does not read are forwarded as they are.
        st.tuples(texts.filter(lambda name: name not in KNOWN_FIELDS), raw_values),
    ),
    max_size=4,
)


@st.composite
def poisoned_bodies(draw: st.DrawFn, path: str) -> bytes:
    """A body for a POST to ``path`` that the relay must refuse: a valid request for that endpoint
    plus exactly one defect (or, sometimes, random known fields around it too)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(WHOLE_BODY_POISONS)
    common = NEUTRAL_POISONS if path in INBOUND_FORMATS else COMMON_POISONS
    name, poison = draw(st.one_of(*common, *ROUTE_POISONS[path]))
    fields: list[Field] = [("model", _text(MODEL)), *draw(VALID_FIELDS[path]), *draw(optional_fields)]
    if draw(st.integers(0, 3)) == 0:
        fields += draw(st.lists(st.tuples(field_names, raw_values), max_size=3))
    if path in STREAMING and draw(st.booleans()):
        # Half the bodies of the streaming endpoints ask for a stream: that is a path of its own.
        fields.append(("stream", b"true"))
    # Last and alone: with repeated keys a JSON parser keeps the last value.
    fields = [(n, v) for n, v in fields if n != name]
    fields.append((name, poison))
    return obj(fields)


# --- heads ------------------------------------------------------------------------------------------

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
RESERVED_HEADERS = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "expect",
    "upgrade",
    "te",
    "trailer",
    "authorization",
    "x-api-key",
}
header_names = st.text(TOKEN_CHARS, min_size=1, max_size=24).filter(lambda n: n not in RESERVED_HEADERS)
# Anything but CR and LF, which would end the header (and let a generated value frame the request).
header_values = st.binary(max_size=60).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))
junk_headers = st.one_of(
    st.lists(st.tuples(header_names.map(str.encode), header_values), max_size=6),
    st.integers(101, 160).map(lambda n: [(b"x-filler-%d" % i, b"1") for i in range(n)]),
    st.integers(33_000, 80_000).map(lambda n: [(b"x-large", b"v" * n)]),
)


def credentials(key: str) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """Authorization headers around ``key``: the key itself, odd schemes, overlong or broken keys."""
    k = key.encode()
    return st.one_of(
        st.just([(b"authorization", b"Bearer " + k)]),
        st.just([(b"x-api-key", k)]),
        st.just([]),
        st.sampled_from(
            [
                [(b"authorization", b"Basic dXNlcjpwYXNz")],
                [(b"authorization", b"Bearer")],
                [(b"authorization", b"Bearer ")],
                [(b"authorization", b"bearer\t" + k)],
                [(b"authorization", b"Token " + k)],
                [(b"authorization", b"Bearer  " + k + b"  ")],
                [(b"authorization", b"Bearer " + k), (b"authorization", b"Bearer rg-x")],
                [(b"authorization", b"Bearer " + k[:-1])],
                [(b"authorization", b"Bearer " + k + b"\x00")],
                [(b"authorization", b"Bearer rg-\x01\x02\x7f")],
                [(b"authorization", b"Bearer " + k + b"\xff")],
            ]
        ),
        st.integers(129, 40_000).map(lambda n: [(b"authorization", b"Bearer rg-" + b"a" * n)]),
        header_values.map(lambda v: [(b"authorization", b"Bearer " + v)]),
    )


content_types = st.sampled_from(
    [
        [(b"content-type", b"application/json")],
        [(b"content-type", b"text/plain")],
        [(b"content-type", b"application/json; charset=latin-1")],
        [(b"content-type", b"\x01")],
        [],
    ]
)

# --- URLs -------------------------------------------------------------------------------------------

QUERY_NAMES = [
    "limit",
    "after",
    "cursor",
    "since_ms",
    "until_ms",
    "min_lsn",
    "status_code",
    "consistent",
    "group_by",
    "granularity",
    "user_id",
    "key_id",
    "model",
    "state",
]
QUERY_VALUES = [
    b"",
    b"0",
    b"-1",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"2147483648",
    b"1" + b"0" * 5000,
    b"1e3",
    b"0x10",
    b"true",
    b"yes",
    b"%00",
    b"%ff%fe",
    b"%zz",
    b"%",
    b"key,user,model,nope",
    b"day",
    b"\xe2\x82\xac",
]
url_safe = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~", max_size=20).map(str.encode)
query_strings = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(QUERY_NAMES), url_safe).map(
            lambda n: n if isinstance(n, bytes) else n.encode()
        ),
        st.one_of(st.sampled_from(QUERY_VALUES), url_safe),
    ),
    max_size=5,
).map(lambda pairs: b"&".join(n + b"=" + v for n, v in pairs))
PATH_SEGMENTS = [
    b"%00",
    b"%ff",
    b"..",
    b"%2e%2e",
    b"a%2Fb",
    b"%E2%82%AC",
    b"x" * 3000,
    b"usr_nope",
    b"key_nope",
]
path_segments = st.one_of(
    st.sampled_from(PATH_SEGMENTS),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=20).map(str.encode),
)


def fill(path: str, segment: bytes) -> bytes:
    """``path`` with every ``{param}`` replaced by ``segment``."""
    out = bytearray()
    rest = path.encode()
    while b"{" in rest:
        before, _, after = rest.partition(b"{")
        out += before + segment
        rest = after.partition(b"}")[2]
    return bytes(out + rest)
