"""Every RPC of auth, quota, the catalog and the logger, enumerated from the service descriptors and
called over the running services: refused without a certificate of the deployment's CA naming a
relaygate identity, refused to identities its rule does not name, and reached by an internal admin
client only with an admin token of the right scope."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.auth import tokens
from services.common.grpc import CHANNEL_OPTIONS, channel
from services.common.pb.relaygate.auth.v1 import auth_pb2, auth_pb2_grpc
from services.common.pb.relaygate.catalog.v1 import catalog_pb2
from services.common.pb.relaygate.logger.v1 import logger_pb2, logger_pb2_grpc
from services.common.pb.relaygate.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.pb.relaygate.relay.v1 import inference_pb2
from services.common.rpc_policy import FRONT_RULES, INFERENCE_SERVICE, READ, RULES, WRITE, method_name
from services.common.tls import ADMIN, CA_FILE, IDENTITIES, RELAY, Tls, server_name
from services.stack_certs import CA_KEY_FILE, ensure_certificates
from tests.e2e.stack import Deployment, ok
from tests.tls import certificates

TIMEOUT = 10.0

# Each service and the process (and certificate identity) that serves it.
SERVED_BY = {
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"]: "auth",
    quota_pb2.DESCRIPTOR.services_by_name["QuotaService"]: "quota",
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"]: "quota",
    logger_pb2.DESCRIPTOR.services_by_name["LoggerService"]: "logger",
}


@dataclass(frozen=True)
class Rpc:
    service: ServiceDescriptor
    method: MethodDescriptor
    server: str

    @property
    def name(self) -> str:
        return method_name(self.service.full_name, self.method.name)

    def bind(self, chan: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        request = message_factory.GetMessageClass(self.method.input_type)
        response = message_factory.GetMessageClass(self.method.output_type)
        return chan.unary_unary(
            self.name, request_serializer=request.SerializeToString, response_deserializer=response.FromString
        )

    def request(self) -> Any:
        return message_factory.GetMessageClass(self.method.input_type)()


def every_rpc() -> Iterator[Rpc]:
    for service, server in SERVED_BY.items():
        for method in service.methods:
            yield Rpc(service, method, server)


async def code_of(rpc: Rpc, chan: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """The status code the call ends with (OK when it went through)."""
    try:
        await rpc.bind(chan)(rpc.request(), timeout=TIMEOUT, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def address(deployment: Deployment, server: str) -> str:
    return f"127.0.0.1:{deployment.stack.port_of(server)}"


@pytest.fixture
async def channels(deployment: Deployment) -> AsyncIterator[dict[tuple[str, str], grpc.aio.Channel]]:
    """(server, identity) → a channel to that server presenting that identity's certificate."""
    opened = {
        (server, identity): channel(
            address(deployment, server), tls=certificates().tls(identity), peer=server
        )
        for server in set(SERVED_BY.values())
        for identity in IDENTITIES
    }
    try:
        yield opened
    finally:
        for chan in opened.values():
            await chan.close(None)


def test_every_rpc_has_exactly_one_rule() -> None:
    described = {rpc.name for rpc in every_rpc()}
    probes = {
        method_name(service.full_name, method.name)
        for module in (health_pb2, reflection_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(RULES) == described | probes
    # Every RPC of the services is unary, which is what the calls below make.
    assert not [r.name for r in every_rpc() if r.method.client_streaming or r.method.server_streaming]
    # The scopes are the ones auth issues.
    assert (READ, WRITE) == (tokens.READ, tokens.WRITE)


def test_the_inference_port_has_a_rule_for_every_rpc_and_no_internal_one() -> None:
    """The relay's inference port answers any caller at the permission check: its handlers then
    authenticate each call by its API key (tests/e2e/test_relay_grpc.py's
    test_every_rpc_refuses_a_missing_or_invalid_key calls every RPC without a key and with a wrong
    one); none of the internal services' RPCs is reachable through its table."""
    inference = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert inference.full_name == INFERENCE_SERVICE
    described = {method_name(inference.full_name, m.name) for m in inference.methods}
    probes = {
        method_name(service.full_name, method.name)
        for module in (health_pb2, reflection_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(FRONT_RULES) == described | probes
    assert all(rule.any_caller and not rule.callers for rule in FRONT_RULES.values())
    assert not [name for name, rule in RULES.items() if rule.any_caller]


async def test_a_call_without_a_client_certificate_is_refused(deployment: Deployment) -> None:
    """No certificate (plaintext, or TLS presenting none) is refused at the TLS handshake: the client
    sees UNAVAILABLE and its channel never becomes READY, so no RPC is ever sent and no handler or
    permission check runs. That is stronger than UNAUTHENTICATED / PERMISSION_DENIED, which a caller
    gets only once its certificate was accepted (the tests below)."""
    ca = certificates().tls(RELAY).ca
    refused: dict[str, set[Any]] = {}
    for server in set(SERVED_BY.values()):
        target = address(deployment, server)
        plaintext = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        no_certificate = grpc.aio.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name(server))],
        )
        try:
            for rpc in (r for r in every_rpc() if r.server == server):
                refused[rpc.name] = {await code_of(rpc, plaintext), await code_of(rpc, no_certificate)}
            # Never connected: the calls above ended in the handshake, not at the server.
            states = {plaintext.get_state(), no_certificate.get_state()}
            assert grpc.ChannelConnectivity.READY not in states, (server, states)
        finally:
            await plaintext.close(None)
            await no_certificate.close(None)
    # The TLS handshake fails: UNAVAILABLE for every RPC, never UNAUTHENTICATED from a handler.
    assert {name: codes for name, codes in refused.items() if codes != {grpc.StatusCode.UNAVAILABLE}} == {}
    assert len(refused) == len(list(every_rpc()))


async def test_a_certificate_the_deployment_did_not_issue_is_refused(
    deployment: Deployment, tmp_path: Any
) -> None:
    foreign = ensure_certificates(tmp_path / "foreign").tls(RELAY)
    ours = certificates().tls(RELAY)
    # Trusts the real server, presents a relay certificate of another CA.
    impostor = Tls(certificate=foreign.certificate, private_key=foreign.private_key, ca=ours.ca)
    async with channel(address(deployment, "quota"), tls=impostor, peer="quota") as chan:
        rpc = next(r for r in every_rpc() if r.method.name == "TopUp")
        assert await code_of(rpc, chan) == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_of_the_ca_naming_no_identity_is_unauthenticated(
    deployment: Deployment, tmp_path: Any
) -> None:
    root = certificates().root
    ca_key = serialization.load_pem_private_key((root / CA_KEY_FILE).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((root / CA_FILE).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issued = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name("intruder"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    stranger = Tls(
        certificate=issued.public_bytes(serialization.Encoding.PEM),
        private_key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        ca=(root / CA_FILE).read_bytes(),
    )
    for server in set(SERVED_BY.values()):
        async with channel(address(deployment, server), tls=stranger, peer=server) as chan:
            codes = {rpc.name: await code_of(rpc, chan) for rpc in every_rpc() if rpc.server == server}
        assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes


async def test_identities_a_rule_does_not_name_are_denied(
    channels: dict[tuple[str, str], grpc.aio.Channel],
) -> None:
    wrong: list[str] = []
    checked = 0
    for rpc in every_rpc():
        rule = RULES[rpc.name]
        for identity in IDENTITIES:
            if identity in rule.callers:
                continue
            code = await code_of(rpc, channels[(rpc.server, identity)])
            checked += 1
            # An admin caller on an admin-level RPC is asked for its token instead.
            expected = (
                grpc.StatusCode.UNAUTHENTICATED
                if identity == ADMIN and rule.admin_scope
                else grpc.StatusCode.PERMISSION_DENIED
            )
            if code != expected:
                wrong.append(f"{rpc.name} as {identity}: {code.name}, expected {expected.name}")
    assert wrong == []
    assert checked >= 3 * len(list(every_rpc()))


async def test_a_denied_top_up_changes_nothing(
    deployment: Deployment, channels: dict[tuple[str, str], grpc.aio.Channel]
) -> None:
    with deployment.admin() as admin:
        user_id = str(ok(admin.post("/admin/v1/users", json={"name": "denied-top-up"}))["user_id"])
    request = quota_pb2.TopUpRequest(user_id=user_id, amount_micros=1_000_000, reason="not allowed")
    for identity in ("auth", "logger", "quota"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await quota_pb2_grpc.QuotaServiceStub(channels[("quota", identity)]).TopUp(
                request, timeout=TIMEOUT
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    relay = quota_pb2_grpc.QuotaServiceStub(channels[("quota", RELAY)])
    balance = await relay.GetBalance(
        quota_pb2.GetBalanceRequest(user_id=user_id, consistent=True), timeout=TIMEOUT
    )
    assert balance.balance_micros == 0


def admin_token(deployment: Deployment, *scopes: str) -> str:
    response = httpx.post(
        f"{deployment.relay_url}/admin/v1/tokens",
        headers={"authorization": f"Bearer {deployment.admin_key}"},
        json={"scopes": list(scopes)} if scopes else {},
        timeout=TIMEOUT,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_an_internal_admin_client_tops_up_with_a_write_token_only(
    deployment: Deployment, channels: dict[tuple[str, str], grpc.aio.Channel]
) -> None:
    with deployment.admin() as admin:
        user_id = str(ok(admin.post("/admin/v1/users", json={"name": "grpc-admin"}))["user_id"])
    quota = quota_pb2_grpc.QuotaServiceStub(channels[("quota", ADMIN)])
    writer, reader = admin_token(deployment), admin_token(deployment, READ)
    top_up = quota_pb2.TopUpRequest(user_id=user_id, amount_micros=2_500_000, reason="over grpc")
    balance = quota_pb2.GetBalanceRequest(user_id=user_id, consistent=True)

    topped = await quota.TopUp(top_up, timeout=TIMEOUT, metadata=bearer(writer))
    assert topped.balance_micros == 2_500_000

    async def refusal(call: Any, request: Any, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(request, timeout=TIMEOUT, metadata=metadata)
        code: grpc.StatusCode = refused.value.code()
        return code

    assert await refusal(quota.TopUp, top_up, bearer(reader)) == grpc.StatusCode.PERMISSION_DENIED
    assert await refusal(quota.TopUp, top_up, ()) == grpc.StatusCode.UNAUTHENTICATED
    assert await refusal(quota.TopUp, top_up, bearer(reader + "x")) == grpc.StatusCode.UNAUTHENTICATED
    read = await quota.GetBalance(balance, timeout=TIMEOUT, metadata=bearer(reader))
    assert read.balance_micros == 2_500_000

    # The logger asks auth too; auth checks tokens presented to it itself.
    logs = logger_pb2_grpc.LoggerServiceStub(channels[("logger", ADMIN)])
    await logs.GetUsageSummary(logger_pb2.GetUsageSummaryRequest(), timeout=TIMEOUT, metadata=bearer(reader))
    auth = auth_pb2_grpc.AuthServiceStub(channels[("auth", ADMIN)])
    listed = await auth.ListUsers(auth_pb2.ListUsersRequest(), timeout=TIMEOUT, metadata=bearer(reader))
    assert user_id in {u.user_id for u in listed.users}
    created = auth_pb2.CreateUserRequest(name="by-a-reader")
    assert await refusal(auth.CreateUser, created, bearer(reader)) == grpc.StatusCode.PERMISSION_DENIED
    # Tokens come from the relay's POST /admin/v1/tokens, which checks the key's CIDRs.
    exchange = auth_pb2.IssueAdminTokenRequest(api_key=deployment.admin_key)
    assert await refusal(auth.IssueAdminToken, exchange, bearer(writer)) == grpc.StatusCode.PERMISSION_DENIED


async def test_health_and_reflection_answer_certificate_holders(
    deployment: Deployment, channels: dict[tuple[str, str], grpc.aio.Channel]
) -> None:
    for server in set(SERVED_BY.values()):
        chan = channels[(server, ADMIN)]
        health = chan.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        status = await health(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = chan.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
        listed = {s.name async for response in call for s in response.list_services_response.service}
        expected = {s.full_name for s, process in SERVED_BY.items() if process == server}
        assert expected | {"grpc.health.v1.Health"} <= listed, listed
