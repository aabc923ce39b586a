"""TLS and mTLS between a probe runtime and clients, with certificates from a throw-away CA (trustme)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitstack.chassis.config import ChassisSettings, ConfigError
from splitstack.chassis.server import ServiceRuntime
from splitstack.chassis.testing.probe import PROBE_SERVICE, build_runtime
from splitstack.chassis.tls import client_channel, server_credentials


@dataclasses.dataclass
class Pki:
    """Files of a CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_pki(directory: Path) -> Pki:
    directory.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("probe-client.splitstack.local")
    pki = Pki(*(directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    ca.cert_pem.write_to_path(str(pki.ca))
    for issued, cert, key in ((server, pki.server_cert, pki.server_key), (client, pki.client_cert, pki.client_key)):
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("tls") / "ours")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("tls") / "theirs")


async def _serve(settings: ChassisSettings) -> ServiceRuntime:
    runtime = build_runtime(settings)
    await runtime.start()
    return runtime


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[ServiceRuntime]:
    runtime = await _serve(ChassisSettings(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                                           shutdown_grace_seconds=2.0))
    yield runtime
    await runtime.stop()


@pytest.fixture
async def mtls_server(pki: Pki) -> AsyncIterator[ServiceRuntime]:
    runtime = await _serve(ChassisSettings(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key),
                                           tls_client_ca_file=str(pki.ca), shutdown_grace_seconds=2.0))
    yield runtime
    await runtime.stop()


def _client(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ChassisSettings:
    return ChassisSettings(peer_tls_ca_file=str(ca or ""), peer_tls_cert_file=str(cert or ""),
                           peer_tls_key_file=str(key or ""))


async def _echo(runtime: ServiceRuntime, client: ChassisSettings, host: str = "127.0.0.1") -> bytes:
    async with client_channel(f"{host}:{runtime.port}", client) as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        return await channel.unary_unary(f"/{PROBE_SERVICE}/Echo")(b"over tls", timeout=10)


async def _refused(runtime: ServiceRuntime, client: ChassisSettings) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _echo(runtime, client)
    return caught.value.code()


async def test_tls_handshake_with_the_ca_succeeds(tls_server: ServiceRuntime, pki: Pki) -> None:
    assert await _echo(tls_server, _client(pki.ca)) == b"over tls"
    assert await _echo(tls_server, _client(pki.ca), host="localhost") == b"over tls"


async def test_plaintext_client_cannot_talk_to_tls_server(tls_server: ServiceRuntime) -> None:
    assert await _refused(tls_server, _client()) == grpc.StatusCode.UNAVAILABLE


async def test_client_trusting_another_ca_is_refused(tls_server: ServiceRuntime, other_pki: Pki) -> None:
    assert await _refused(tls_server, _client(other_pki.ca)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_accepts_a_client_certificate_from_the_ca(mtls_server: ServiceRuntime, pki: Pki) -> None:
    assert await _echo(mtls_server, _client(pki.ca, pki.client_cert, pki.client_key)) == b"over tls"


async def test_mtls_rejects_a_client_without_certificate(mtls_server: ServiceRuntime, pki: Pki) -> None:
    assert await _refused(mtls_server, _client(pki.ca)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_rejects_a_client_certificate_from_another_ca(mtls_server: ServiceRuntime, pki: Pki,
                                                                  other_pki: Pki) -> None:
    client = _client(pki.ca, other_pki.client_cert, other_pki.client_key)
    assert await _refused(mtls_server, client) == grpc.StatusCode.UNAVAILABLE


def test_no_tls_settings_means_plaintext() -> None:
    assert server_credentials(ChassisSettings()) is None


def test_missing_file_is_a_config_error_naming_the_setting(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="tls_key_file"):
        server_credentials(ChassisSettings(tls_cert_file=str(pki.server_cert), tls_key_file=missing))
    with pytest.raises(ConfigError, match="peer_tls_ca_file"):
        client_channel("127.0.0.1:1", _client(Path(missing)))


def test_half_configured_tls_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="together"):
        server_credentials(ChassisSettings(tls_cert_file=str(pki.server_cert)))
    with pytest.raises(ConfigError, match="tls_client_ca_file"):
        server_credentials(ChassisSettings(tls_client_ca_file=str(pki.ca)))
    with pytest.raises(ConfigError, match="peer_tls_ca_file"):
        client_channel("127.0.0.1:1", _client(None, pki.client_cert, pki.client_key))
