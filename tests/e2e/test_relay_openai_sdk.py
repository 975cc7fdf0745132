"""The relay through the official ``openai`` SDK: every endpoint, streaming and not, and the SDK's own
exception classes for the errors the gateway produces."""

from __future__ import annotations

import base64

import openai
import pytest

from tests.e2e.stack import MODEL, Deployment, fund_user, settled_balance


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    # These tests count holds after each request: exact reservations only (tests/e2e/test_leases.py
    # covers leases, whose hold stays until the key goes quiet).
    return {"RELAYGATE_CREDIT_LEASES": "false"}


@pytest.fixture(autouse=True)
def _fresh_upstream(deployment: Deployment) -> None:
    deployment.upstream.reset()


def sdk(deployment: Deployment, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.relay_url}/v1", api_key=key, max_retries=0, timeout=10)


@pytest.fixture
def client(deployment: Deployment) -> openai.OpenAI:
    _, key = fund_user(deployment, 10_000_000)
    return sdk(deployment, key)


def test_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    completion = raw.parse()
    assert (completion.choices[0].message.content or "").split() == ["tok0", "tok1", "tok2", "tok3", "tok4"]
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-relaygate-overhead-ms"]) >= 0


def test_chat_stream_with_and_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["tok0", "tok1", "tok2", "tok3"]
    # The relay asked for usage on the caller's behalf; that chunk is not theirs to see.
    assert all(c.choices for c in chunks)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="say", max_tokens=3)
    assert completion.choices[0].text.split() == ["tok0", "tok1", "tok2"]
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    pieces = [
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="say", max_tokens=3, stream=True)
    ]
    assert "".join(pieces).split() == ["tok0", "tok1", "tok2"]


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=["one", "two"], encoding_format="float")
    assert [len(item.embedding) for item in result.data] == [8, 8]
    assert result.usage.prompt_tokens > 0
    # The SDK's default asks for base64 and decodes it; the relay passes the bytes through.
    assert len(client.embeddings.create(model=MODEL, input="one").data[0].embedding) == 8


def test_images(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    images = sdk(deployment, key).images.generate(
        model=MODEL, prompt="a cat", n=2, response_format="b64_json"
    )
    assert images.data is not None
    assert len(images.data) == 2
    assert base64.b64decode(images.data[0].b64_json or "").startswith(b"\x89PNG")
    assert settled_balance(deployment, user_id)["reserved_micros"] == 0


def test_models_lists_only_what_the_key_may_use(deployment: Deployment) -> None:
    _, key = fund_user(deployment, 1_000_000)
    assert [m.id for m in sdk(deployment, key).models.list()] == [MODEL]
    assert sdk(deployment, key).models.retrieve(MODEL).id == MODEL
    _, scoped = fund_user(deployment, 1_000_000, allowed_models=["other-*"])
    assert list(sdk(deployment, scoped).models.list()) == []
    with pytest.raises(openai.NotFoundError):
        sdk(deployment, scoped).models.retrieve(MODEL)


def test_authentication_error(deployment: Deployment) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(deployment, "rg-" + "A" * 40).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.code == "invalid_api_key"


def test_permission_denied(deployment: Deployment) -> None:
    _, key = fund_user(deployment, 1_000_000, allowed_models=["some-other-model"])
    with pytest.raises(openai.PermissionDeniedError):
        sdk(deployment, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert raised.value.code == "model_not_found"


def test_insufficient_quota(deployment: Deployment) -> None:
    _, key = fund_user(deployment, 1)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(deployment, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert raised.value.code == "insufficient_quota"


def test_rate_limit_headers_and_429(deployment: Deployment) -> None:
    _, key = fund_user(deployment, 10_000_000, limits={"rpm": 2})
    client = sdk(deployment, key)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-reset-requests"]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert raised.value.response.headers.get("retry-after")


@pytest.mark.parametrize(
    ("status", "error"), [(500, openai.InternalServerError), (503, openai.InternalServerError)]
)
def test_upstream_failures_are_5xx(
    deployment: Deployment, status: int, error: type[openai.APIStatusError]
) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    deployment.upstream.configure(fail_status=status, fail_count=-1)
    with pytest.raises(error) as raised:
        sdk(deployment, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code >= 500
    after = settled_balance(deployment, user_id)
    assert (after["balance_micros"], after["reserved_micros"]) == (10_000_000, 0)


def test_an_upstream_caller_error_is_passed_through(client: openai.OpenAI, deployment: Deployment) -> None:
    deployment.upstream.configure(fail_status=400, fail_count=1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert deployment.upstream.stats()["requests_total"] == 1


def test_an_answer_without_usage_is_billed_as_a_marked_estimate(deployment: Deployment) -> None:
    user_id, key = fund_user(deployment, 10_000_000)
    deployment.upstream.configure(omit_usage=True)
    completion = sdk(deployment, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    assert completion.usage is None
    after = settled_balance(deployment, user_id)
    assert after["reserved_micros"] == 0
    assert 10_000_000 - after["balance_micros"] > 0
