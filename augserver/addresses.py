"""Network addresses: ``HOST:PORT`` pairs and ZeroMQ endpoints."""

from __future__ import annotations

import re

_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]*\]|[^\s:\[\]]+):(\d{1,5})")
_WILDCARD = re.compile(r"tcp://(\*|0\.0\.0\.0|\[::\]|\[\*\]):(\d+)")


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:9100`` for IPv6) as ``(host, port)``; ValueError if not one."""
    match = _HOST_PORT.fullmatch(text) if isinstance(text, str) else None
    if match is None or int(match[2]) > 65535:
        raise ValueError(f"must be HOST:PORT like 0.0.0.0:9100, got {text!r}")
    return match[1].strip("[]"), int(match[2])


def local_address(address: str) -> str:
    """Where processes on this host connect to a dispatcher bound at ``address`` (a wildcard
    host becomes the loopback)."""
    match = _WILDCARD.fullmatch(address)
    if match is None:
        return address
    host = "[::1]" if match[1] in ("[::]", "[*]") else "127.0.0.1"
    return f"tcp://{host}:{match[2]}"
