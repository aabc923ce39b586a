"""TLS for gRPC, from settings: server credentials (TLS or mTLS) and client channels to peers.

Server: `tls_cert_file` + `tls_key_file` turn TLS on; `tls_client_ca_file` on top requires every
client to present a certificate signed by that CA (mTLS). Client: `peer_tls_ca_file`
(SPLITSTACK_TLS_CA_FILE) turns TLS on for calls to peers; `peer_tls_cert_file` +
`peer_tls_key_file` present a client certificate. A file that is named but unreadable is a
ConfigError at start, never a silent fall-back to plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from splitstack.chassis.config import ChassisSettings, ConfigError


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}={path!r} cannot be read: {exc.strerror}") from None


def _key_pair(cert_setting: str, cert: str, key_setting: str, key: str) -> tuple[bytes, bytes] | None:
    """(private key, certificate chain) when both are set; ConfigError when only one is."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError(f"{cert_setting} and {key_setting} must be set together "
                          f"(got {cert_setting}={cert!r}, {key_setting}={key!r})")
    return _read(key_setting, key), _read(cert_setting, cert)


def server_credentials(settings: ChassisSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the server, requiring client certificates when a client CA is set."""
    pair = _key_pair("tls_cert_file", settings.tls_cert_file, "tls_key_file", settings.tls_key_file)
    if pair is None:
        if settings.tls_client_ca_file:
            raise ConfigError("tls_client_ca_file is set but tls_cert_file/tls_key_file are not")
        return None
    if not settings.tls_client_ca_file:
        return grpc.ssl_server_credentials([pair])
    client_ca = _read("tls_client_ca_file", settings.tls_client_ca_file)
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=True)


def channel_credentials(settings: ChassisSettings) -> grpc.ChannelCredentials | None:
    """Credentials for calling peers, or None for plaintext (no peer CA configured)."""
    pair = _key_pair("peer_tls_cert_file", settings.peer_tls_cert_file,
                     "peer_tls_key_file", settings.peer_tls_key_file)
    if not settings.peer_tls_ca_file:
        if pair is not None:
            raise ConfigError("peer_tls_cert_file/peer_tls_key_file are set but peer_tls_ca_file "
                              "(SPLITSTACK_TLS_CA_FILE) is not")
        return None
    ca = _read("peer_tls_ca_file", settings.peer_tls_ca_file)
    if pair is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    key, chain = pair
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def channel_options(settings: ChassisSettings, options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Message size limits from settings, overridden by `options`."""
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": settings.max_message_bytes,
        "grpc.max_receive_message_length": settings.max_message_bytes,
    }
    merged.update(dict(options))
    return list(merged.items())


def client_channel(address: str, settings: ChassisSettings, *,
                   options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An aio channel to a peer at `address` ("host:port"), TLS when a peer CA is configured."""
    credentials = channel_credentials(settings)
    merged = channel_options(settings, options)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=merged)
    return grpc.aio.secure_channel(address, credentials, options=merged)
