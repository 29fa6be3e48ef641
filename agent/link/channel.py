"""The gRPC channel to the coordinator: credentials, keepalive, message bounds.

TLS is the default (system CAs, or ``ca_file``), a client certificate turns it
into mTLS, and plaintext needs ``insecure: true`` in the config, nothing less.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from ..config import CoordinatorConfig

# Bigger than any legitimate message (a UsageReport of 10k records is ~2 MiB);
# a peer that sends more is broken or hostile and gets RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class ChannelConfigError(Exception):
    """A credential file cannot be read; the message names it."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ChannelConfigError(
            f"coordinator.{what}: cannot read {path}: {exc.strerror}"
        ) from None


def channel_options(
    config: CoordinatorConfig, authority: str | None = None
) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        # Pings every keepalive_time even when idle: NATs and load balancers drop
        # idle flows after 60-350 s, and a dead peer is noticed within
        # keepalive_time + keepalive_timeout instead of the TCP timeout (minutes).
        ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Our own loop reconnects (session.py); these keep the channel's internal
        # subchannel backoff on the same schedule should it ever retry by itself.
        ("grpc.initial_reconnect_backoff_ms", int(config.reconnect_initial * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.reconnect_max * 1000)),
        ("grpc.enable_retries", 0),
    ]
    if config.server_name:
        # TLS verifies this name, and it is the :authority too.
        options.append(("grpc.ssl_target_name_override", config.server_name))
    elif authority:
        # The address dialed is one IP of a DNS name (targets.py): the channel presents
        # the name as :authority and TLS verifies the certificate against it, as a dial
        # by name would. (Both options at once fail every call: gRPC checks the call's
        # authority against the certificate of the override name.)
        options.append(("grpc.default_authority", authority))
    return options


def credentials(config: CoordinatorConfig) -> grpc.ChannelCredentials:
    root = _read(config.ca_file, "ca_file") if config.ca_file else None
    key = chain = None
    if config.client_cert_file and config.client_key_file:
        chain = _read(config.client_cert_file, "client_cert_file")
        key = _read(config.client_key_file, "client_key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )


def make_channel(config: CoordinatorConfig, authority: str | None = None) -> grpc.aio.Channel:
    """A fresh channel; TLS unless the config says ``insecure: true``.

    ``authority``: the name to present and verify when ``config.address`` is an IP the
    link resolved that name to.
    """
    options = channel_options(config, authority)
    # One address per channel: the link picks which replica, and which record (session.py).
    address = config.targets[0]
    if config.insecure:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials(config), options=options)
