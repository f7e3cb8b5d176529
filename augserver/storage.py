"""Reading and writing bytes where datasets live: local paths, ``http(s)://`` and ``s3://``.

One small interface, :class:`Store`: the size of an object, a byte range of it, all of it, and
(for ``augserver shard``) writing one. S3 goes through boto3, which finds credentials and the
endpoint as every AWS tool does (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and the shared files, ``AWS_ENDPOINT_URL``, ``AWS_REGION``), plus the job's
``dataset.s3: {endpoint_url, region}`` for S3-compatible stores. boto3 was chosen over fsspec
with s3fs: it is the reference client, synchronous (workers read from plain threads), and
``get_object`` with a ``Range`` is all random access needs. HTTP uses the standard library.

Reads are retried with exponential back-off (:data:`ATTEMPTS` in all) when the store is
unreachable or answers 5xx; then, like a missing object or refused credentials at once, they
raise :class:`StorageError` naming the object and why.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

from augserver.errors import AugserverError
from augserver.files import atomic_write

ATTEMPTS = 5
"""Tries of one read before it fails (waits 0.2, 0.4, 0.8, 1.6 s in between)."""
BACKOFF = 0.2
TIMEOUT = 10.0
"""Seconds to connect or to wait for data before a try counts as failed."""

T = TypeVar("T")


class StorageError(AugserverError, OSError):
    """An object could not be read or written: it names the object and why. ``unreachable``:
    the store itself did not answer (every try failed in a transient way), so other objects
    of it cannot be read either."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def store_unreachable(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what caused it is a :class:`StorageError` of a store that did not
    answer."""
    while exc is not None:
        if isinstance(exc, StorageError) and exc.unreachable:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_remote(path: str) -> bool:
    """Whether ``path`` is an ``http(s)://`` or ``s3://`` URL."""
    return urlparse(path).scheme in ("http", "https", "s3")


def join(base: str, name: str) -> str:
    """``name`` next to ``base`` (a path or URL of a file): the same folder or prefix."""
    if is_remote(base):
        return base.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(base), name)


class Store:
    """Bytes of objects named by path or URL."""

    def size(self, url: str) -> int:
        raise NotImplementedError

    def read(self, url: str, start: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes from ``start`` (to the end when None); fewer only at the end."""
        raise NotImplementedError

    def write(self, url: str, data: bytes) -> None:
        raise NotImplementedError


class LocalStore(Store):
    def size(self, url: str) -> int:
        try:
            return os.stat(url).st_size
        except OSError as exc:
            raise StorageError(f"{url}: {exc.strerror or exc}") from None

    def read(self, url: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            with open(url, "rb") as f:
                f.seek(start)
                return f.read() if length is None else f.read(length)
        except OSError as exc:
            raise StorageError(f"{url}: {exc.strerror or exc}") from None

    def write(self, url: str, data: bytes) -> None:
        atomic_write(url, lambda f: f.write(data))


def _retrying(url: str, attempt: Callable[[], T], transient: Callable[[Exception], bool]) -> T:
    """``attempt()``, retried with back-off while it fails in a ``transient`` way."""
    for n in range(ATTEMPTS):
        try:
            return attempt()
        except StorageError:
            raise
        except Exception as exc:
            if not transient(exc) or n == ATTEMPTS - 1:
                tries = f" after {n + 1} tries" if n else ""
                raise StorageError(f"{url}: {_reason(exc)}{tries}",
                                   unreachable=transient(exc)) from None
            time.sleep(BACKOFF * 2**n)
    raise AssertionError("unreachable")


def _reason(exc: Exception) -> str:
    code = _status(exc)
    if code in (401, 403):
        return (f"access denied ({code}): check the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the endpoint")
    if code == 404:
        return "no such object (404)"
    if code == 416:
        return "range beyond the end of the object (416): is it truncated?"
    return f"{type(exc).__name__}: {exc}"


def _status(exc: Exception) -> int | None:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
        error = response.get("Error", {}).get("Code")
        if error in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            return 404
    return None


def _transient(exc: Exception) -> bool:
    code = _status(exc)
    return code is None or code >= 500 or code == 429


class HttpStore(Store):
    """Objects served over HTTP(S); byte ranges with ``Range`` requests."""

    def _open(self, url: str, headers: dict[str, str], method: str = "GET") -> Any:
        request = urllib.request.Request(url, headers=headers, method=method)
        return urllib.request.urlopen(request, timeout=TIMEOUT)

    def size(self, url: str) -> int:
        def head() -> int:
            with self._open(url, {}, "HEAD") as response:
                return int(response.headers["Content-Length"])

        return _retrying(url, head, _transient)

    def read(self, url: str, start: int = 0, length: int | None = None) -> bytes:
        end = "" if length is None else str(start + length - 1)
        headers = {"Range": f"bytes={start}-{end}"} if start or length is not None else {}

        def get() -> bytes:
            with self._open(url, headers) as response:
                return response.read()

        return _retrying(url, get, _transient)

    def write(self, url: str, data: bytes) -> None:
        raise StorageError(f"{url}: writing over HTTP is not supported (use a path or s3://)")


@dataclass(frozen=True)
class S3Options:
    """The job's ``dataset.s3``: for S3-compatible stores; None defers to the environment."""

    endpoint_url: str | None = None
    region: str | None = None


class S3Store(Store):
    """Objects in S3 or an S3-compatible store, through one boto3 client."""

    def __init__(self, options: S3Options | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - boto3 is a dependency of the s3 extra
            raise StorageError("s3:// needs boto3: pip install 'augserver[s3]'") from None
        options = options or S3Options()
        config = Config(connect_timeout=TIMEOUT, read_timeout=TIMEOUT,
                        retries={"max_attempts": 1, "mode": "standard"},
                        max_pool_connections=32)
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config)

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        parsed = urlparse(url)
        if not parsed.netloc or not parsed.path.strip("/"):
            raise StorageError(f"{url}: an S3 URL is s3://BUCKET/KEY")
        return parsed.netloc, parsed.path.lstrip("/")

    def size(self, url: str) -> int:
        bucket, key = self._split(url)
        return _retrying(
            url, lambda: self._client.head_object(Bucket=bucket, Key=key)["ContentLength"],
            _transient)

    def read(self, url: str, start: int = 0, length: int | None = None) -> bytes:
        bucket, key = self._split(url)
        extra = {}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            extra["Range"] = f"bytes={start}-{end}"

        def get() -> bytes:
            return self._client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()

        return _retrying(url, get, _transient)

    def write(self, url: str, data: bytes) -> None:
        bucket, key = self._split(url)
        _retrying(url, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=data),
                  _transient)


def open_store(url: str, s3: S3Options | None = None) -> Store:
    """The store that holds ``url``."""
    scheme = urlparse(url).scheme
    if scheme == "s3":
        return S3Store(s3)
    if scheme in ("http", "https"):
        return HttpStore()
    return LocalStore()
