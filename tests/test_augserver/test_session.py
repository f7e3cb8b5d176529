"""augserver.session: a dispatcher that never answers is diagnosed from what the socket saw."""

from __future__ import annotations

import socket

import pytest
import zmq

from augserver import session
from augserver.errors import SessionTimeout
from augserver.security import ClientKeys

pytestmark = pytest.mark.unit


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _timeout_message(address: str, keys: ClientKeys | None, timeout: float = 0.8) -> str:
    context = zmq.Context.instance()
    sock = session.dealer(context, address, keys)
    try:
        with pytest.raises(SessionTimeout) as caught:
            session.handshake(sock, "status", "probe", address, timeout, curve=keys is not None)
    finally:
        sock.close(linger=0)
    return str(caught.value)


@pytest.fixture()
def router() -> zmq.Socket:
    """A ROUTER that accepts connections and never answers (no CURVE)."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    yield sock
    sock.close(linger=0)


def _keys(server_public: bytes) -> ClientKeys:
    public, secret = zmq.curve_keypair()
    return ClientKeys(public=public, secret=secret, server=server_public)


def test_nothing_listening_says_so_and_mentions_no_curve() -> None:
    message = _timeout_message(f"tcp://127.0.0.1:{_unused_port()}", None)
    assert "nothing accepted a connection" in message
    assert "CURVE" not in message


def test_a_peer_that_accepts_but_never_answers_is_named(router: zmq.Socket) -> None:
    port = router.bind_to_random_port("tcp://127.0.0.1")
    message = _timeout_message(f"tcp://127.0.0.1:{port}", None)
    assert "accepted the connection but did not answer" in message
    assert "CURVE" not in message


def test_a_curve_dispatcher_reached_without_keys_says_curve_is_required(
    router: zmq.Socket,
) -> None:
    public, secret = zmq.curve_keypair()
    router.curve_server = True
    router.curve_secretkey = secret
    router.curve_publickey = public
    port = router.bind_to_random_port("tcp://127.0.0.1")
    message = _timeout_message(f"tcp://127.0.0.1:{port}", None)
    assert "the dispatcher requires CURVE: pass --key" in message
    wrong = _timeout_message(f"tcp://127.0.0.1:{port}", _keys(zmq.curve_keypair()[0]))
    assert "CURVE authentication failed" in wrong


def test_keys_offered_to_a_dispatcher_without_curve_are_named(router: zmq.Socket) -> None:
    port = router.bind_to_random_port("tcp://127.0.0.1")
    message = _timeout_message(f"tcp://127.0.0.1:{port}", _keys(zmq.curve_keypair()[0]))
    assert "does not use CURVE here" in message


def test_the_monitor_is_closed_after_a_handshake(router: zmq.Socket) -> None:
    """A watched socket can be watched again: the first monitor was released."""
    port = router.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    sock = session.dealer(zmq.Context.instance(), address)
    try:
        for _ in range(2):
            with pytest.raises(SessionTimeout):
                session.handshake(sock, "status", "probe", address, 0.3, curve=False)
    finally:
        sock.close(linger=0)
