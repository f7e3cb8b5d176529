"""Network addresses: ``HOST:PORT`` pairs and ZeroMQ endpoints."""

from __future__ import annotations

import argparse
import re

_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]*\]|[^\s:\[\]]+):(\d{1,5})")
_TCP = re.compile(r"tcp://(\[[0-9a-fA-F:.*]*\]|[^\s:/\[\]]+):(\*|\d+)")
_LOCAL = re.compile(r"(ipc|inproc)://\S+")


def check_endpoint(address: str, *, bind: bool) -> str:
    """``address`` if it is a ZeroMQ endpoint this side can use, else ValueError saying why:
    ``tcp://HOST:PORT`` with PORT in 1..65535 (to bind also ``*`` or 0: any free port),
    ``ipc://PATH`` or ``inproc://NAME``."""
    if not isinstance(address, str):
        raise ValueError(f"must be a ZeroMQ address like tcp://HOST:5555, got {address!r}")
    if _LOCAL.fullmatch(address):
        return address
    match = _TCP.fullmatch(address)
    if match is None:
        hint = " (the tcp:// is missing)" if _HOST_PORT.fullmatch(address) else ""
        raise ValueError(f"must be a ZeroMQ address like tcp://HOST:5555, ipc://PATH or "
                         f"inproc://NAME, got {address!r}{hint}")
    port = match[2]
    lowest = 0 if bind else 1
    if port == "*" and not bind:
        raise ValueError(f"{address!r}: a port to connect to cannot be *")
    if port != "*" and not lowest <= int(port) <= 65535:
        valid = "0 (any free port), * or 1..65535" if bind else "1..65535"
        raise ValueError(f"{address!r}: port {int(port)} is not in {valid}")
    return address


def is_local(address: str) -> bool:
    """Whether only this host can reach ``address``: ipc:// and inproc://, or tcp:// on a
    loopback host (127.x.x.x, localhost, ::1). A wildcard (``*``, 0.0.0.0, ::) is not."""
    if _LOCAL.fullmatch(address):
        return True
    match = _TCP.fullmatch(address)
    if match is None:
        return False
    host = match[1].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def connect_address(text: str) -> str:
    """argparse type: a dispatcher address to connect to (see :func:`check_endpoint`)."""
    try:
        return check_endpoint(text, bind=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
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
