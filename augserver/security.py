"""CURVE encryption and authentication with ZeroMQ's own mechanism (off by default).

The dispatcher has a key pair; its ROUTER is a CURVE server, and a ZAP handler
(:class:`zmq.auth.thread.ThreadAuthenticator`) admits only the public keys found in the
allow-list directory (read when the dispatcher starts) plus the dispatcher's own key (its local
workers and health checks use it). Workers, clients and ``augserver status`` are CURVE clients:
their own key pair and the dispatcher's public key. A peer whose key is not allowed never gets
a connection: ZeroMQ drops it during the handshake, before the dispatcher sees any message.

Key files are the ones :func:`zmq.auth.create_certificates` writes (``NAME.key`` public,
``NAME.key_secret`` secret and public); ``augserver keys`` makes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from augserver.errors import KeyFileError

KeySource = str | os.PathLike[str] | bytes
"""A key file's path, or the key itself as 40 bytes of Z85 text."""


def has_curve() -> bool:
    """Whether this libzmq was built with CURVE."""
    return bool(zmq.has("curve"))


def _certificate(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot load CURVE key file {os.fspath(path)}: {exc}") from None
    if public is None:
        raise KeyFileError(f"{os.fspath(path)} holds no CURVE public key")
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"{os.fspath(path)}: a CURVE key is 40 characters of Z85 text, "
                           f"this file's is {len(public)}")
    return public, secret


def key_pair(source: KeySource) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a ``.key_secret`` file or a Z85 secret key."""
    if isinstance(source, bytes):
        return zmq.curve_public(source), source
    public, secret = _certificate(source)
    if secret is None:
        raise KeyFileError(f"{os.fspath(source)} holds no secret key (use the .key_secret file)")
    return public, secret


def public_key(source: KeySource) -> bytes:
    """The public key of a key file (``.key`` or ``.key_secret``) or a Z85 public key."""
    return source if isinstance(source, bytes) else _certificate(source)[0]


@dataclass(frozen=True)
class ClientKeys:
    """What a CURVE client (worker, loader, status) needs: its pair and the server's key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, key: KeySource | None, server_key: KeySource | None) -> ClientKeys | None:
        """Keys from ``key`` (own secret) and ``server_key`` (dispatcher's public); None when
        both are None. Giving only one is an error."""
        if key is None and server_key is None:
            return None
        if key is None or server_key is None:
            raise KeyFileError("CURVE needs both keys: this side's secret key and the "
                            "dispatcher's public key")
        public, secret = key_pair(key)
        return cls(public, secret, public_key(server_key))

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client (before it connects)."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def start_server(
    context: zmq.Context, sock: zmq.Socket, server_key: KeySource, allow_dir: str | os.PathLike[str]
) -> ThreadAuthenticator:
    """Make ``sock`` (not yet bound) a CURVE server admitting only the keys in ``allow_dir``
    and its own; returns the started authenticator, to :meth:`~ThreadAuthenticator.stop`."""
    public, secret = key_pair(server_key)
    allowed = allowed_keys(allow_dir)
    auth = ThreadAuthenticator(context)
    auth.start()
    try:
        # pyzmq logs and skips a folder it cannot read; the keys are checked here first
        auth.configure_curve(domain="*", location=os.fspath(allow_dir))
        auth.certs["*"] = {**dict.fromkeys(allowed, True), public: True}  # and our own key
    except Exception:
        auth.stop()
        raise
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return auth


def allowed_keys(allow_dir: str | os.PathLike[str]) -> list[bytes]:
    """The public keys of every ``*.key`` file in the allow-list folder; :class:`KeyFileError`
    naming the first file that is not a CURVE key file (a stray or truncated file would
    otherwise silently empty the allow-list)."""
    folder = Path(allow_dir)
    if not folder.is_dir():
        raise KeyFileError(f"CURVE allow-list {os.fspath(allow_dir)} is not a directory")
    return [public_key(path) for path in sorted(folder.glob("*.key"))]


def create_keys(out: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``out/NAME.key`` (public) and ``out/NAME.key_secret`` (secret, mode 0600).

    Raises FileExistsError when either file exists already.
    """
    folder = Path(out)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting a key")
    folder.mkdir(parents=True, exist_ok=True)
    old_mask = os.umask(0o077)
    try:
        written = zmq.auth.create_certificates(os.fspath(folder), name)
    finally:
        os.umask(old_mask)
    public.chmod(0o644)
    secret.chmod(0o600)
    return Path(written[0]), Path(written[1])
