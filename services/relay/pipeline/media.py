"""Image URLs of a chat body, fetched by the relay and inlined as ``data:`` URLs, for requests routed to
channels that cannot take an arbitrary URL (Gemini's ``fileData.fileUri``; see
:mod:`services.relay.providers.gemini`).

It runs in :func:`~services.relay.pipeline.relay.admit`, once per request, before anything is held or
sent upstream: a provider's ``request()`` is synchronous and built again for each channel tried, so it
cannot fetch, and a URL that cannot be used is the caller's 400, never charged. The inlined body then
goes to every channel tried (OpenAI-compatible ones take data URLs too), so a failover sends the image
the first channel got. URLs of Gemini's own Files API stay URLs: only Gemini can read them.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from services.common.errors import InvalidRequest
from services.relay.upstream.fetch import FetchedImage, FetchRefused, ImageFetcher

__all__ = ["inline_images", "remote_images"]

# Gemini Files API URIs (https://generativelanguage.googleapis.com/v1beta/files/...), sent as fileData.
_GEMINI_FILES = "https://generativelanguage.googleapis.com/"
_CONCURRENT = 4


def remote_images(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, image_url object)`` of every image part whose URL the relay must fetch; ``where`` names
    the part for the caller (``messages[1].content[0]``)."""
    found: list[tuple[str, dict[str, Any]]] = []
    messages = body.get("messages")
    for m, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        for p, part in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or url.startswith(("data:", _GEMINI_FILES)):
                continue
            assert isinstance(image, dict)
            found.append((f"messages[{m}].content[{p}]", image))
    return found


async def inline_images(body: dict[str, Any], fetcher: ImageFetcher) -> dict[str, Any] | None:
    """A copy of ``body`` whose image URLs are ``data:`` URLs of the fetched images; None when it has no
    image to fetch. Raises :class:`InvalidRequest` naming the first part that could not be fetched."""
    wanted = len(remote_images(body))
    if not wanted:
        return None
    limit = fetcher.policy.max_images
    if wanted > limit:
        raise InvalidRequest(
            f"At most {limit} image URLs are fetched for a request; send the others as data URLs.",
            param="messages",
        )
    # Copied down to the image objects only: the caller's parsed body is left as it came.
    copy = {**body, "messages": [_copied(message) for message in body["messages"]]}
    images = remote_images(copy)
    # A few at a time: each may hold up to the size cap in memory.
    gate = asyncio.Semaphore(_CONCURRENT)

    async def fetched(url: str) -> FetchedImage:
        async with gate:
            return await fetcher.fetch(url)

    results = await asyncio.gather(*(fetched(image["url"]) for _, image in images), return_exceptions=True)
    for (where, image), result in zip(images, results, strict=True):
        if isinstance(result, FetchRefused):
            raise InvalidRequest(f"{where}: the image URL cannot be used: {result}", param="messages")
        if isinstance(result, BaseException):
            raise result
        image["url"] = f"data:{result.media_type};base64,{base64.b64encode(result.data).decode()}"
    return copy


def _copied(message: Any) -> Any:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = [
        {**part, "image_url": dict(part["image_url"])}
        if isinstance(part, dict) and isinstance(part.get("image_url"), dict)
        else part
        for part in content
    ]
    return {**message, "content": parts}
