"""The fake upstream's Azure OpenAI deployment paths, spoken to by the ``openai`` SDK's ``AzureOpenAI``."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from services.fake_upstream import FakeUpstream

API_VERSION = "2024-10-21"
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be terse."},  # 2 words
    {"role": "user", "content": "Say something"},  # 2 words
]
PROMPT_TOKENS = 2 + 2 + len(MESSAGES)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(chunks=3) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[openai.AzureOpenAI]:
    with openai.AzureOpenAI(
        azure_endpoint=upstream.url, api_key="azure-key", api_version=API_VERSION, max_retries=0, timeout=5
    ) as sdk:
        yield sdk


def test_chat(client: openai.AzureOpenAI, upstream: FakeUpstream) -> None:
    completion = client.chat.completions.create(model="my-deployment", messages=MESSAGES)
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, 3)
    last = upstream.stats()["last_request"]
    assert last is not None and last["path"] == "/openai/deployments/my-deployment/chat/completions"
    assert last["headers"]["api-key"] == "azure-key"


def test_chat_stream(client: openai.AzureOpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="my-deployment", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "tok0 tok1 tok2 "
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_deployment_is_the_model(upstream: FakeUpstream) -> None:
    # Azure bodies need no model: the deployment names it.
    response = httpx.post(
        f"{upstream.url}/openai/deployments/gpt-dep/chat/completions?api-version={API_VERSION}",
        json={"messages": MESSAGES},
        headers={"api-key": "k"},
        timeout=5,
    )
    assert response.status_code == 200 and response.json()["model"] == "gpt-dep"


def test_embeddings(client: openai.AzureOpenAI) -> None:
    embedded = client.embeddings.create(model="embedding-deployment", input=["one two", "three"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 8
    assert embedded.usage.prompt_tokens == 3


def test_refusals(upstream: FakeUpstream) -> None:
    url = f"{upstream.url}/openai/deployments/d/chat/completions"
    body = {"messages": MESSAGES}

    def post(query: str, headers: dict[str, str]) -> tuple[int, object]:
        response = httpx.post(url + query, json=body, headers=headers, timeout=5)
        answer = response.json()
        return response.status_code, answer["error"]["code"] if "error" in answer else None

    assert post(f"?api-version={API_VERSION}", {}) == (401, "401")
    assert post("", {"api-key": "k"}) == (404, "404")
    assert post("?api-version=latest", {"api-key": "k"}) == (400, "BadRequest")
    assert post(f"?api-version={API_VERSION}", {"authorization": "Bearer entra-token"})[0] == 200
    upstream.configure(api_key="right")
    assert post(f"?api-version={API_VERSION}", {"api-key": "wrong"}) == (401, "401")
    assert post(f"?api-version={API_VERSION}-preview", {"api-key": "right"})[0] == 200


def test_sdk_errors(client: openai.AzureOpenAI, upstream: FakeUpstream) -> None:
    upstream.configure(api_key="another")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="d", messages=MESSAGES)
    upstream.configure(api_key=None, fail_status=429, fail_count=1, retry_after=4)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="d", messages=MESSAGES)
    assert limited.value.response.headers["retry-after"] == "4"
    assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.value.code == "429"
    # Errors about the body itself are OpenAI's, as Azure passes them through.
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model="d", messages=[])
    assert invalid.value.code == "invalid_value" and invalid.value.param == "messages"
