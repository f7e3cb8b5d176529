"""Every error augserver raises on purpose, under one root: :class:`AugserverError`.

This module imports nothing from augserver, so any layer may raise these without an import
cycle. Each class also derives from the built-in exception it refines (``ValueError`` for bad
input, ``TimeoutError`` for a wait that ran out), so callers that catch those keep working.
"""

from __future__ import annotations

from typing import Any


class AugserverError(Exception):
    """The root of augserver's own errors: ``except AugserverError`` catches every one."""


class ConfigError(AugserverError, ValueError):
    """An invalid job configuration; the message names the file and the dotted key.

    ``source`` is the file (or ``"<config>"``), ``key`` the dotted key, None for the whole file.
    """

    def __init__(self, message: str, source: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.source, self.key)


class DatasetError(AugserverError):
    """A dataset file (or one sample of it) that cannot be read, decoded or validated.

    ``path`` names the file (for a sample of an array file, ``file[i]``); ``index`` is the
    sample index, or None when the whole file is unusable.
    """

    def __init__(self, path: str, index: int | None, cause: str) -> None:
        self.path = path
        self.index = index
        self.cause = cause
        where = f"sample {index} ({path})" if index is not None else path
        super().__init__(f"cannot read {where}: {cause}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.index, self.cause)


class ProtocolError(AugserverError, ValueError):
    """A message that does not follow the wire protocol (the text says what is wrong)."""


class KeyFileError(AugserverError, ValueError):
    """A CURVE key file that is missing, unreadable or lacks the key asked for."""


class RemoteError(AugserverError, RuntimeError):
    """The dispatcher refused us or reported an error (the text is the dispatcher's message)."""


class SessionTimeout(AugserverError, TimeoutError):
    """No dispatcher answered in time; the message says where and what may be wrong."""
