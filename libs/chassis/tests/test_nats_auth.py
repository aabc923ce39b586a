"""connect_bus against nats-servers that require credentials (user/password, token, nkey) or TLS:
rejected quickly with an error that says "authorization" without them, working with them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nkeys
import pytest
import trustme

from splitstack.chassis.bus import BusConnectError, connect_bus
from splitstack.chassis.config import ChassisSettings
from splitstack.chassis.testing.servers import start_nats
from splitstack.contracts.events import STREAMS, subject
from splitstack.events.v1 import events_pb2

pytestmark = pytest.mark.timeout(30)


def user_nkey_pair() -> tuple[bytes, str]:
    """A fresh user nkey: (seed, public key 'U...')."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


def auth_case(kind: str, tmp_path: Path) -> tuple[str, dict, dict]:
    """(server authorization config, settings fields that pass, settings fields that must fail)."""
    if kind == "user":
        return ("authorization { user: trainer, password: s3cret-pw }",
                {"nats_user": "trainer", "nats_password": "s3cret-pw"},
                {"nats_user": "trainer", "nats_password": "wrong"})
    if kind == "token":
        return ("authorization { token: tok-123456 }", {"nats_token": "tok-123456"}, {"nats_token": "tok-654321"})
    seed, public = user_nkey_pair()
    (tmp_path / "user.nk").write_bytes(seed)
    other_seed, _ = user_nkey_pair()
    (tmp_path / "other.nk").write_bytes(other_seed)
    return (f"authorization {{ users = [ {{ nkey: {public} }} ] }}",
            {"nats_nkey_seed_file": str(tmp_path / "user.nk")},
            {"nats_nkey_seed_file": str(tmp_path / "other.nk")})


@pytest.mark.parametrize("kind", ["user", "token", "nkey"])
async def test_server_requiring_credentials(tmp_path, kind):
    config, good, wrong = auth_case(kind, tmp_path)
    server = start_nats(tmp_path / "nats", config_text=config)
    try:
        for fields in ({}, wrong):
            begun = time.monotonic()
            with pytest.raises(BusConnectError, match="authorization") as failure:
                await connect_bus(ChassisSettings(nats_url=server.url, nats_connect_timeout_seconds=10, **fields),
                                  producer="trainer")
            assert server.url in str(failure.value)
            assert time.monotonic() - begun < 3.0  # rejected at once, not retried until the timeout
        bus = await connect_bus(ChassisSettings(nats_url=server.url, nats_connect_timeout_seconds=5, **good),
                                producer="trainer")
        try:
            await bus.ensure_streams([STREAMS["SPLITSTACK_TRAINING"]])
            result = await bus.publish(subject("training_finished", model="digits"), events_pb2.TrainingFinished())
            assert (result.stream, result.seq, result.duplicate) == ("SPLITSTACK_TRAINING", 1, False)
        finally:
            await bus.close(2.0)
    finally:
        server.stop()


async def test_missing_nkey_seed_file_is_named(tmp_path):
    settings = ChassisSettings(nats_url="nats://127.0.0.1:1", nats_nkey_seed_file=str(tmp_path / "absent.nk"))
    with pytest.raises(BusConnectError, match="absent.nk"):
        await connect_bus(settings, producer="trainer")


async def test_tls_server_with_ca_file(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(tmp_path / "server.key")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "server.crt")
    ca.cert_pem.write_to_path(tmp_path / "ca.crt")
    config = f'tls {{ cert_file: "{tmp_path / "server.crt"}", key_file: "{tmp_path / "server.key"}" }}'
    server = start_nats(tmp_path / "nats", config_text=config)
    try:
        untrusting = ChassisSettings(nats_url=server.url, nats_connect_timeout_seconds=1)
        with pytest.raises(BusConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await connect_bus(untrusting, producer="trainer")
        settings = ChassisSettings(nats_url=server.url, nats_tls_ca_file=str(tmp_path / "ca.crt"),
                                   nats_connect_timeout_seconds=5)
        bus = await connect_bus(settings, producer="trainer")
        try:
            await bus.ensure_streams([STREAMS["SPLITSTACK_TRAINING"]])
            result = await bus.publish(subject("training_finished", model="digits"), events_pb2.TrainingFinished())
            assert result.seq == 1
        finally:
            await bus.close(2.0)
    finally:
        server.stop()
