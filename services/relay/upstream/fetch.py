"""Fetching a caller's image URL for a channel that cannot take the URL itself (Gemini), without letting
the caller reach what only the relay can reach (SSRF).

A fetch resolves the host once, refuses every answer that is not a public unicast address (loopback,
private, link-local, multicast, reserved, unspecified, shared and documentation ranges; IPv4 inside
IPv6 — mapped, NAT64, 6to4 — is judged as the IPv4 address it carries), and connects to the address it
checked: the URL is rewritten to that address, with the name kept in ``Host`` and TLS's SNI and
certificate check, so no second lookup can answer differently (DNS rebinding). A host answering with
any refused address is refused whole: which answer a connection would use is not ours to choose.
Redirects are followed by hand, at most ``max_redirects``, each hop checked the same way. The body is
read as a stream and refused past ``max_bytes``; the whole fetch, redirects included, gets
``timeout_s``; the answer's ``Content-Type`` must be one of ``image_types``.

Hosts named in ``allow_hosts`` skip the address checks (still pinned): for tests on loopback and for
private deployments whose images live on an internal host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx

__all__ = [
    "FetchPolicy",
    "FetchRefused",
    "FetchedImage",
    "ImageFetcher",
    "Resolver",
    "checked_address",
    "refusal",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses the host resolves to.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIXTO4 = ipaddress.IPv6Network("2002::/16")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


class FetchRefused(Exception):
    """The URL was not fetched, or its answer not taken; the message says why, for the caller."""


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    allow_http: bool = False
    allow_hosts: frozenset[str] = frozenset()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3
    # Image URLs fetched for one request at most.
    max_images: int = 16
    image_types: frozenset[str] = frozenset(
        {"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif", "image/gif"}
    )


@dataclass(frozen=True, slots=True)
class FetchedImage:
    media_type: str
    data: bytes


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    return None


def refusal(address: Address) -> str | None:
    """Why ``address`` may not be fetched from (``"loopback"``, ``"private"``, ...), None when public."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_v4(address)
        if inner is not None:
            return refusal(inner)
    # Most specific first: 127.0.0.1 is private and reserved too, and loopback says it best.
    for reason, hit in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        # Shared (100.64/10), benchmarking and the like: neither private nor routable.
        ("not globally routable", not address.is_global),
    ):
        if hit:
            return reason
    return None


def checked_address(host: str, answers: Iterable[str]) -> Address:
    """The address to connect to among ``host``'s DNS ``answers``; refuses the host when there is none
    or when any answer is not public."""
    addresses = [ipaddress.ip_address(answer.split("%", 1)[0]) for answer in answers]
    if not addresses:
        raise FetchRefused(f"the host {host!r} did not resolve")
    for address in addresses:
        reason = refusal(address)
        if reason is not None:
            raise FetchRefused(f"the host {host!r} resolves to a {reason} address ({address})")
    return addresses[0]


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class ImageFetcher:
    """One pooled client for every image fetch of the process; owned (and closed) by the app's lifespan."""

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolver: Resolver = _system_resolver,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.policy = policy
        self._resolve = resolver
        # Redirects are followed here, each hop checked; the environment's proxies would connect
        # elsewhere than the address checked.
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=10),
            timeout=httpx.Timeout(policy.timeout_s),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> FetchedImage:
        """The image at ``url``; raises :class:`FetchRefused` saying why it is not."""
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                return await self._follow(url)
        except TimeoutError:
            raise FetchRefused(f"the image did not arrive within {self.policy.timeout_s:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchRefused(f"the image could not be fetched ({type(exc).__name__})") from None

    async def _follow(self, url: str) -> FetchedImage:
        for _ in range(self.policy.max_redirects + 1):
            request = await self._pinned(url)
            response = await self._client.send(request, stream=True)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchRefused(f"the image URL answered {response.status_code} with no Location")
                    url = urllib.parse.urljoin(url, location)
                    continue
                return await self._image(response)
            finally:
                await response.aclose()
        raise FetchRefused(f"the image URL redirected more than {self.policy.max_redirects} times")

    async def _pinned(self, url: str) -> httpx.Request:
        """A request for ``url`` sent to the address its host was checked to resolve to."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise FetchRefused("the image URL is not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme != "https" and not (scheme == "http" and self.policy.allow_http):
            allowed = "http or https" if self.policy.allow_http else "https"
            raise FetchRefused(f"the image URL must be {allowed}, not {scheme or 'relative'}")
        host = (parts.hostname or "").lower()
        if not host:
            raise FetchRefused("the image URL has no host")
        port = port or (443 if scheme == "https" else 80)
        address = await self._address(host, port)
        literal = f"[{address}]" if address.version == 6 else str(address)
        target = urllib.parse.urlunsplit((scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
        default_port = port == (443 if scheme == "https" else 80)
        host_header = parts.hostname or host
        if ":" in host_header:
            host_header = f"[{host_header}]"
        if not default_port:
            host_header = f"{host_header}:{port}"
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        return self._client.build_request(
            "GET",
            target,
            headers={"Host": host_header, "Accept": ", ".join(sorted(self.policy.image_types))},
            extensions=extensions,
        )

    async def _address(self, host: str, port: int) -> Address:
        try:
            literal: Address | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            answers = [str(literal)]
        else:
            try:
                answers = await self._resolve(host, port)
            except OSError:
                raise FetchRefused(f"the host {host!r} did not resolve") from None
        if host in self.policy.allow_hosts:
            if not answers:
                raise FetchRefused(f"the host {host!r} did not resolve")
            return ipaddress.ip_address(answers[0].split("%", 1)[0])
        return checked_address(host, answers)

    async def _image(self, response: httpx.Response) -> FetchedImage:
        if response.status_code != 200:
            raise FetchRefused(f"the image URL answered {response.status_code}")
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type not in self.policy.image_types:
            accepted = ", ".join(sorted(self.policy.image_types))
            raise FetchRefused(f"the URL's content type {media_type or 'none'!r} is not one of {accepted}")
        cap = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise FetchRefused(f"the image is larger than {cap} bytes")
        data = bytearray()
        async for chunk in response.aiter_bytes(_CHUNK):
            data += chunk
            if len(data) > cap:
                raise FetchRefused(f"the image is larger than {cap} bytes")
        return FetchedImage(media_type, bytes(data))
