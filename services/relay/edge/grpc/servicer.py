"""``relaygate.relay.v1.InferenceService``: a thin adapter over the request pipeline
(:mod:`services.relay.pipeline.relay`), as :mod:`services.relay.edge.http.routes` is for HTTP.

Each call reads the API key (``authorization: Bearer rg-…``), the caller's address and its metadata,
opens the request's record with ``front="grpc"``, turns the request message into OpenAI's JSON
(:mod:`.convert`) and walks the pipeline: admit, then answer_json or relay_stream, or refuse. So a
gRPC call is authenticated, limited, admitted on credit, failed over, settled and logged exactly as
an HTTP request is. Failures end the call with the status of :mod:`.status`.

Metadata read: ``authorization`` (or ``x-api-key``), ``x-request-id`` (the caller's own, kept for
correlation), ``x-relaygate-cache`` (the response cache switch, as the HTTP header). The trailing
metadata carries the gateway facts the HTTP front sends as response headers
(:func:`services.relay.meter.facts.gateway_facts`: request id, ``x-ratelimit-*``,
``x-relaygate-overhead-ms``, ``x-relaygate-available-micros``, ``x-relaygate-cache``), taken when
HTTP takes them: once the answer is in, or when a stream starts (the upstream has answered). A stream
also sends ``x-request-id`` in its initial metadata, before its first chunk; a unary call sends no
initial metadata of its own, so that gRPC sends its (empty) headers, the answer and the trailers in
one write (a separate send_initial_metadata cost ~80 us of CPU per call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from services.common import tracing
from services.common.errors import GatewayError
from services.common.pb.relaygate.relay.v1 import inference_pb2 as pb
from services.common.pb.relaygate.relay.v1 import inference_pb2_grpc as pb_grpc
from services.common.rpc_auth import peer_address
from services.common.rpc_policy import INFERENCE_SERVICE, method_name
from services.relay.edge.grpc import convert
from services.relay.edge.grpc.chunks import GrpcSink
from services.relay.edge.grpc.status import Metadata, refusal
from services.relay.meter.facts import gateway_facts
from services.relay.meter.record import Exchange
from services.relay.pipeline import relay as pipeline
from services.relay.pipeline.checks import MAX_API_KEY_CHARS, bounded_credential
from services.relay.pipeline.gateway import Gateway
from services.relay.pipeline.principals import extract_api_key
from services.relay.stream.streaming import StreamRelay

__all__ = ["InferenceServicer"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Caller:
    """What a call's metadata says about its caller."""

    authorization: str | None = None
    x_api_key: str | None = None
    request_id: str = ""
    cache: str | None = None

    @classmethod
    def of(cls, context: Context) -> Caller:
        found: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, str) and key not in found:
                found[key] = value
        return cls(
            authorization=found.get("authorization"),
            x_api_key=found.get("x-api-key"),
            request_id=found.get("x-request-id", ""),
            cache=found.get("x-relaygate-cache"),
        )

    def api_key(self) -> str:
        return bounded_credential(extract_api_key(self.authorization, self.x_api_key), MAX_API_KEY_CHARS)


def gateway_metadata(exchange: Exchange, *, cache: bytes | None = None) -> Metadata:
    """The HTTP front's gateway headers of ``exchange``, as gRPC metadata (the same names)."""
    return tuple(
        (name.decode("ascii"), value.decode("ascii")) for name, value in gateway_facts(exchange, cache=cache)
    )


async def _abort(
    context: Context, exc: GatewayError, exchange: Exchange | None = None, facts: Metadata = ()
) -> NoReturn:
    """End the call with ``exc``'s status; ``facts`` are the gateway facts already taken (a stream
    that fails after its first chunk keeps them next to the error's details)."""
    ended = refusal(
        exc,
        request_id=exchange.request_id if exchange is not None else "",
        principal=exchange.principal if exchange is not None else None,
    )
    trailing = (*ended.metadata, *(fact for fact in facts if fact[0] != "x-request-id"))
    await context.abort(ended.code, ended.message, trailing_metadata=trailing)


def _span(context: Context, method: str) -> AbstractContextManager[Any]:
    """The call's server span (tracing off: nothing), opened before its record so the usage event
    carries its trace id."""
    return tracing.grpc_request(method_name(INFERENCE_SERVICE, method), context.invocation_metadata())


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """The inference RPCs over one :class:`Gateway` (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def _begin(self, context: Context, caller: Caller, endpoint: pipeline.Endpoint) -> Exchange:
        return Exchange.begin(
            endpoint=endpoint.name,
            client_ip=peer_address(context),
            client_request_id=caller.request_id,
            front="grpc",
        )

    async def _answer(
        self,
        context: Context,
        method: str,
        endpoint: pipeline.Endpoint,
        build: Callable[[], bytes],
        reply: M,
    ) -> M:
        """Serve a unary call: ``build`` makes the OpenAI body, ``reply`` is filled from the answer."""
        with _span(context, method):
            return await self._answer_in_span(context, endpoint, build, reply)

    async def _answer_in_span(
        self, context: Context, endpoint: pipeline.Endpoint, build: Callable[[], bytes], reply: M
    ) -> M:
        gateway = self._gateway
        caller = Caller.of(context)
        exchange = self._begin(context, caller, endpoint)
        try:
            api_key = caller.api_key()
            request = await pipeline.admit(gateway, exchange, endpoint, api_key, build())
            answer = await pipeline.answer_json(gateway, exchange, request, cache_hint=caller.cache)
        except asyncio.CancelledError:
            pipeline.abandon(gateway, exchange)
            raise
        except GatewayError as exc:
            await pipeline.refuse(gateway, exchange, exc)
            await _abort(context, exc, exchange)
        except Exception:
            log.exception("unhandled error in %s", endpoint.name)
            # Released and answered, rather than left to expire (quota bills an expired hold).
            await pipeline.refuse(gateway, exchange, GatewayError())
            await _abort(context, GatewayError(), exchange)
        context.set_trailing_metadata(gateway_metadata(exchange, cache=answer.cache))
        pipeline.keep_answer(gateway, exchange, answer)
        try:
            return convert.read_answer(answer.body, reply)
        except GatewayError as exc:
            # Settled and billed: the answer was delivered upstream of us but does not fit the reply.
            log.warning("answer does not fit %s: %s", type(reply).__name__, exc.message)
            await _abort(context, exc, exchange)

    async def CreateChatCompletion(
        self, request: pb.ChatCompletionRequest, context: Context
    ) -> pb.ChatCompletion:
        return await self._answer(
            context,
            "CreateChatCompletion",
            pipeline.CHAT,
            lambda: convert.chat_body(request, stream=False),
            pb.ChatCompletion(),
        )

    async def CreateCompletion(self, request: pb.CompletionRequest, context: Context) -> pb.Completion:
        return await self._answer(
            context,
            "CreateCompletion",
            pipeline.COMPLETIONS,
            lambda: convert.completion_body(request),
            pb.Completion(),
        )

    async def CreateEmbedding(self, request: pb.EmbeddingRequest, context: Context) -> pb.EmbeddingResponse:
        return await self._answer(
            context,
            "CreateEmbedding",
            pipeline.EMBEDDINGS,
            lambda: convert.embedding_body(request),
            pb.EmbeddingResponse(),
        )

    async def StreamChatCompletion(self, request: pb.ChatCompletionRequest, context: Context) -> None:  # type: ignore[override]
        """Chunks as the upstream sends them. Once the stream is delivered its pump settles it,
        whatever ends it (a cancelled call included, drained like an HTTP disconnect)."""
        with _span(context, "StreamChatCompletion"):
            await self._stream(request, context)

    async def _stream(self, request: pb.ChatCompletionRequest, context: Context) -> None:
        gateway = self._gateway
        caller = Caller.of(context)
        exchange = self._begin(context, caller, pipeline.CHAT)
        sink = GrpcSink(context, request_id=exchange.request_id)
        delivered = False
        facts: Metadata = ()

        async def deliver(relay: StreamRelay) -> None:
            nonlocal delivered, facts
            delivered = True
            # Taken where the HTTP front takes its stream's headers: the upstream has answered.
            facts = gateway_metadata(exchange)
            context.set_trailing_metadata(facts)
            await relay.run(sink)

        try:
            api_key = caller.api_key()
            admitted = await pipeline.admit(
                gateway, exchange, pipeline.CHAT, api_key, convert.chat_body(request, stream=True)
            )
            await pipeline.relay_stream(
                gateway, exchange, admitted, error_event=sink.error_event, deliver=deliver
            )
        except asyncio.CancelledError:
            pipeline.abandon(gateway, exchange)
            raise
        except grpc.aio.AbortError:
            raise
        except GatewayError as exc:
            if not delivered:
                await pipeline.refuse(gateway, exchange, exc)
            await _abort(context, exc, exchange, facts)
        except Exception:
            log.exception("unhandled error in %s", pipeline.CHAT.name)
            if not delivered:
                await pipeline.refuse(gateway, exchange, GatewayError())
            await _abort(context, GatewayError(), exchange, facts)
        if sink.failure is not None:
            await _abort(context, sink.failure, exchange, facts)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        """The models the caller's key may use among those the channels serve."""
        with _span(context, "ListModels"):
            return await self._list_models(context)

    async def _list_models(self, context: Context) -> pb.ListModelsResponse:
        try:
            allowed = await pipeline.allowed_models(
                self._gateway, Caller.of(context).api_key(), client_ip=peer_address(context)
            )
        except GatewayError as exc:
            await _abort(context, exc)
        created = int(time.time())
        return pb.ListModelsResponse(
            object="list",
            data=[pb.Model(id=m, object="model", created=created, owned_by="relaygate") for m in allowed],
        )
