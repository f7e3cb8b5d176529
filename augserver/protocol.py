"""The wire protocol every augserver process speaks: one module, imported by both sides.

A message is a ZeroMQ multipart message. Frame 0 is a msgpack map (no extension types, never
pickle) holding the protocol version ``v``, the message type ``t``, the type's fields, and
``arrays``: one ``[dtype, shape]`` pair per following frame, and optionally a receipt ``r``
(:data:`MAX_RECEIPT`). Each following frame is the raw
bytes of one C-contiguous array, sent and received without copies (``copy=False``; received
arrays are ``np.frombuffer`` views of the ZeroMQ frame).

Everyone connects to the dispatcher's one ROUTER socket with a DEALER socket and starts with
``hello`` (its role and the versions that decide pixel bytes). The conversations:

worker                                   dispatcher
  hello{role=worker, versions}    ->       <- welcome{config, dataset_len, classes, dataset}
                                           <- refused{reason}
  ready{slots, dataset}           ->       <- task{task, epoch, indices, slot}  (at most slots)
                                           <- refused{reason}  (the dataset differs)
  result{task, failed, slot}      ->          (arrays: views uint8 (V,n,H,W,3), labels, indices;
    + arrays                                  a result gives back the worker slot its task used)
  heartbeat{}  every interval     ->       <- heartbeat{} | reset{reason} (unknown worker)
  leave{reason}                   ->          (it cannot serve the job: no credentials, ...)

client                                   dispatcher
  hello{role=client, versions}    ->     <- welcome{config, dataset_len, classes} | refused{reason}
  open{stream, epoch, rank, ...}  ->       <- opened{stream, num_batches, batch_bytes}
  credit{stream, n, free}         ->       <- batch{stream, position, failed, slot} + arrays
  ping{}                          ->       <- pong{} | reset{reason}
  close{stream}                   ->       <- end{stream} once every batch was sent
                                           <- error{message, stream, fatal}

status                                   dispatcher
  hello{role=status}              ->       <- status{stats}

:func:`decode` validates everything it returns: the version, the type, every field's type,
the number of array frames and each frame's size against its declared dtype and shape. Any
violation is a :class:`ProtocolError`; receivers log it, answer ``error`` where they can, and
keep serving.

Shared memory (:mod:`augserver.shm`). A client whose host can offers its arena in ``open``'s
``shm`` (``{arena, token, slots, slot_bytes}``, else None). A task may then carry a ``slot``
(``{arena, token, slot}``, else None): the worker writes the views there if it can and answers
with ``slot`` ``written`` and only the labels and indices as arrays; else it sends the views
as usual and says ``unusable`` (it cannot see the arena), ``dirty`` (a thread it abandoned may
still write the slot) or ``none``. The batch to the client names the slot (``slot``, else
None, the views then following as on TCP), and the client's ``credit`` lists in ``free`` the
slots it has copied out and released. ``end`` lists in ``lost`` the slots someone may still
write (their writer was lost); a client whose stream ended with none may use its arena again
for its next stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgpack
import numpy as np

from augserver.errors import ProtocolError
from augserver.shm import MAX_SLOTS, NAME, SLOT_ALIGN, TOKEN_BYTES

PROTOCOL_VERSION = 5
"""2: ``welcome`` names the dataset's classes; ``welcome`` and ``ready`` carry the dataset's
fingerprint (:meth:`augserver.datasets.Dataset.fingerprint`). 3: every message may carry a
receipt ``r`` (see :data:`MAX_RECEIPT`). 4: the shared-memory fields ``open.shm``,
``task.slot``, ``result.slot``, ``batch.slot`` and ``credit.free``. 5: a worker's ``leave``
(why it cannot serve the job); workers write slots with ``pwrite``."""
MAX_RECEIPT = (1 << 63) - 1
"""Receipts are integers in ``0..MAX_RECEIPT``, 0 meaning none. The dispatcher stamps each
message it sends with a fresh random receipt; a peer returns, on what it sends, the receipt of
the latest message it has read, which proves everything sent to it before has left the
dispatcher (see :mod:`augserver.outbox`)."""
MAX_HEADER_BYTES = 1 << 20
"""Largest frame 0 accepted (a task or a batch header with its index list fits easily)."""
MAX_ARRAYS = 8
ALLOWED_DTYPES = frozenset({"|u1", "<i8", "<f4"})
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}

ROLES = ("worker", "client", "status")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_non_negative_int(v) for v in value)


def _ranges(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(r, list) and len(r) == 2 and all(_non_negative_int(v) for v in r) and r[0] < r[1]
        for r in value
    )


def _failures(value: Any) -> bool:
    """``[[index, path, error], ...]``: samples a worker could not decode."""
    return isinstance(value, list) and all(
        isinstance(f, list)
        and len(f) == 3
        and _non_negative_int(f[0])
        and isinstance(f[1], str)
        and isinstance(f[2], str)
        for f in value
    )


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _is(kind: type | tuple[type, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind) and not (
        isinstance(value, bool) and kind is not bool
    )


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _optional_bytes(value: Any) -> bool:
    return value is None or isinstance(value, bytes)


def _arena(value: Any) -> bool:
    return (isinstance(value, str) and NAME.fullmatch(value) is not None)


def _token(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == TOKEN_BYTES


def _offered_arena(value: Any) -> bool:
    """``open.shm``: None or ``{arena, token, slots, slot_bytes}``."""
    return value is None or (
        isinstance(value, dict) and value.keys() == {"arena", "token", "slots", "slot_bytes"}
        and _arena(value["arena"]) and _token(value["token"])
        and _positive_int(value["slots"]) and value["slots"] <= MAX_SLOTS
        and _positive_int(value["slot_bytes"]) and value["slot_bytes"] % SLOT_ALIGN == 0)


def _task_slot(value: Any) -> bool:
    """``task.slot``: None or ``{arena, token, slot}``."""
    return value is None or (
        isinstance(value, dict) and value.keys() == {"arena", "token", "slot"}
        and _arena(value["arena"]) and _token(value["token"])
        and _non_negative_int(value["slot"]) and value["slot"] < MAX_SLOTS)


def _optional_slot(value: Any) -> bool:
    return value is None or (_non_negative_int(value) and value < MAX_SLOTS)


SLOT_NONE, SLOT_WRITTEN, SLOT_UNUSABLE, SLOT_DIRTY = "none", "written", "unusable", "dirty"
SLOT_STATES = (SLOT_NONE, SLOT_WRITTEN, SLOT_UNUSABLE, SLOT_DIRTY)
"""``result.slot``: no slot given or used (views inline), views written in the task's slot,
the slot's arena cannot be used here (views inline), or views inline and the slot perhaps
still being written by a thread the worker abandoned (the dispatcher never reuses it)."""

_STR, _BOOL, _DICT = _is(str), _is(bool), _is(dict)

SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "hello": {
        "role": lambda role: role in ROLES,
        "protocol": _is_int,
        "versions": _str_map,
        "name": _STR,
    },
    "welcome": {"config": _DICT, "dataset_len": _non_negative_int, "classes": _str_list,
                "dataset": _str_map},
    "refused": {"reason": _STR},
    "reset": {"reason": _STR},
    "error": {"message": _STR, "stream": _optional_str, "fatal": _BOOL},
    "ready": {"slots": _positive_int, "dataset": _str_map},
    "task": {"task": _non_negative_int, "epoch": _non_negative_int, "indices": _int_list,
             "slot": _task_slot},
    "result": {"task": _non_negative_int, "failed": _failures,
               "slot": lambda value: value in SLOT_STATES},
    "heartbeat": {},
    "leave": {"reason": _STR},
    "open": {
        "stream": _STR,
        "epoch": _non_negative_int,
        "rank": _non_negative_int,
        "world_size": _positive_int,
        "ordered": _BOOL,
        "credits": _non_negative_int,
        "done": _ranges,
        "skip": _optional_bytes,
        "shm": _offered_arena,
    },
    "opened": {"stream": _STR, "num_batches": _non_negative_int, "batch_bytes": _positive_int},
    "credit": {"stream": _STR, "n": _positive_int, "free": _int_list},
    "batch": {"stream": _STR, "position": _non_negative_int, "failed": _failures,
              "slot": _optional_slot},
    "end": {"stream": _STR, "lost": _int_list},
    "close": {"stream": _STR},
    "ping": {},
    "pong": {},
    "status": {"stats": _DICT},
}
"""Message type to its fields and a check for each field's value."""

OPTIONAL: dict[str, dict[str, Any]] = {
    "open": {"shm": None},
    "task": {"slot": None},
    "result": {"slot": SLOT_NONE},
    "batch": {"slot": None},
    "credit": {"free": ()},
    "end": {"lost": ()},
}
"""Fields that may be left out, with the value they then have (the shared-memory fields: a
message over TCP does not carry them)."""


@dataclass
class Message:
    """A decoded message: its type, its fields and its array frames, each checked against its
    ``(dtype, shape)`` in ``specs``; :attr:`arrays` views them as numpy arrays (no copies)."""

    type: str
    fields: dict[str, Any]
    frames: list[Any] = field(default_factory=list)
    specs: list[tuple[np.dtype, tuple[int, ...]]] = field(default_factory=list)
    described: list[Any] = field(default_factory=list)  # the header's ``arrays``, as sent
    receipt: int = 0  # the envelope's ``r``: 0 when it has none

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    @cached_property
    def arrays(self) -> list[np.ndarray]:
        """The array frames as numpy arrays: views of the received buffers, made on first use."""
        return [
            np.frombuffer(_buffer(frame), dtype=dtype).reshape(shape)
            for frame, (dtype, shape) in zip(self.frames, self.specs, strict=True)
        ]


def encode(
    mtype: str, arrays: Sequence[np.ndarray] = (), *, receipt: int = 0, **fields: Any
) -> list[Any]:
    """Frames of one message: the msgpack header, then each array's raw buffer (not copied);
    ``receipt`` goes in the envelope when it is not 0."""
    check_fields(mtype, fields)
    return pack(mtype, arrays, fields, receipt)


def pack(
    mtype: str, arrays: Sequence[np.ndarray], fields: dict[str, Any], receipt: int = 0
) -> list[Any]:
    """:func:`encode` without checking ``fields``: for the dispatcher's hot path, whose
    messages are built only from values it has validated already."""
    buffers = []
    descriptions = []
    for array in arrays:
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        if array.dtype.str not in ALLOWED_DTYPES:
            raise ProtocolError(f"dtype {array.dtype.str} cannot be sent")
        descriptions.append([array.dtype.str, list(array.shape)])
        buffers.append(array.data if array.size else b"")
    header = {"v": PROTOCOL_VERSION, "t": mtype, "arrays": descriptions, **fields}
    if receipt:
        header["r"] = receipt
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def relay(mtype: str, message: Message, fields: dict[str, Any], receipt: int = 0) -> list[Any]:
    """The array frames of a decoded ``message`` (as received: not copied, not re-checked)
    under a new ``mtype`` header with ``fields``; like :func:`pack`, for values already valid."""
    header = {"v": PROTOCOL_VERSION, "t": mtype, "arrays": message.described, **fields}
    if receipt:
        header["r"] = receipt
    return [msgpack.packb(header, use_bin_type=True), *message.frames]


def size(frames: Sequence[Any]) -> int:
    """Bytes in the frames of one message."""
    return sum(_nbytes(frame) for frame in frames)


def decode(frames: Sequence[Any]) -> Message:
    """Validate and decode the frames of one message (``zmq.Frame``, bytes or buffers).

    Raises :class:`ProtocolError` naming what is wrong: an oversized or undecodable header, a
    foreign protocol version, an unknown type, a missing, extra or mistyped field, or an array
    frame whose size does not match its declared dtype and shape.
    """
    header = _header(frames)
    version = header.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    mtype = header.pop("t", None)
    descriptions = header.pop("arrays", None)
    receipt = header.pop("r", 0)
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {mtype!r}")
    if not (_is_int(receipt) and 0 <= receipt <= MAX_RECEIPT):
        raise ProtocolError(f"{mtype}: invalid receipt {receipt!r:.40}")
    check_fields(mtype, header)
    payload = list(frames[1:])
    specs = _check_arrays(mtype, descriptions, payload)
    return Message(mtype, header, payload, specs, descriptions, receipt)


def _header(frames: Sequence[Any]) -> dict[Any, Any]:
    """Frame 0 unpacked as a map (size-bounded, no extension types), not yet validated."""
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            head, raw=False, strict_map_key=True, ext_hook=_refuse_ext, timestamp=0
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return header


def foreign_hello(frames: Sequence[Any]) -> int | str | None:
    """The protocol version of a ``hello`` from another protocol version, else None: peeks at
    the header of a message :func:`decode` refused, so that the peer can be told why."""
    try:
        header = _header(frames)
    except ProtocolError:
        return None
    version = header.get("v")
    if header.get("t") == "hello" and version != PROTOCOL_VERSION and (
        isinstance(version, int | str) and not isinstance(version, bool)
    ):
        return version
    return None


def check_fields(mtype: str, fields: dict[str, Any]) -> None:
    """Raise :class:`ProtocolError` unless ``fields`` are exactly those of ``mtype``, valid;
    the :data:`OPTIONAL` fields left out are filled in with their defaults."""
    schema = SCHEMAS.get(mtype)
    if schema is None:
        raise ProtocolError(f"unknown message type {mtype!r}")
    for name, default in OPTIONAL.get(mtype, {}).items():
        if name not in fields:
            fields[name] = list(default) if isinstance(default, tuple) else default
    if fields.keys() != schema.keys():
        missing = schema.keys() - fields.keys()
        extra = fields.keys() - schema.keys()
        raise ProtocolError(
            f"{mtype}: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}"
        )
    for name, check in schema.items():
        if not check(fields[name]):
            raise ProtocolError(f"{mtype}: invalid value for field {name!r}: {fields[name]!r:.80}")


def _check_arrays(
    mtype: str, descriptions: Any, frames: Sequence[Any]
) -> list[tuple[np.dtype, tuple[int, ...]]]:
    """Each frame's ``(dtype, shape)``, checked: well described, and the frame's size right."""
    if not isinstance(descriptions, list) or len(descriptions) > MAX_ARRAYS:
        raise ProtocolError(f"{mtype}: 'arrays' must be a list of at most {MAX_ARRAYS}")
    if len(descriptions) != len(frames):
        raise ProtocolError(
            f"{mtype}: header describes {len(descriptions)} arrays but {len(frames)} frames follow"
        )
    specs = []
    for i, (description, frame) in enumerate(zip(descriptions, frames, strict=True)):
        dtype, shape = _description(description)
        if dtype is None:
            raise ProtocolError(f"{mtype}: array {i} is badly described: {description!r:.60}")
        size = _nbytes(frame)
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise ProtocolError(
                f"{mtype}: array {i} declares {dtype.str}{list(shape)} ({expected} bytes) "
                f"but its frame has {size} bytes"
            )
        specs.append((dtype, shape))
    return specs


def _description(description: Any) -> tuple[np.dtype | None, tuple[int, ...]]:
    """``(dtype, shape)`` of a valid ``[dtype, shape]`` array description, else ``(None, ())``."""
    if type(description) is not list or len(description) != 2:
        return None, ()
    dtype = _DTYPES.get(description[0]) if type(description[0]) is str else None
    shape = description[1]
    if dtype is None or type(shape) is not list:
        return None, ()
    for extent in shape:
        if type(extent) is not int or extent < 0:
            return None, ()
    return dtype, tuple(shape)


def _nbytes(frame: Any) -> int:
    """The size in bytes of a ``zmq.Frame``, ``bytes`` or buffer."""
    if isinstance(frame, bytes | bytearray) or hasattr(frame, "buffer"):
        return len(frame)  # zmq.Frame: its size, without making a memoryview
    return _buffer(frame).nbytes


def _buffer(frame: Any) -> memoryview:
    """The bytes of a ``zmq.Frame``, ``bytes`` or buffer, as a flat memoryview (no copy)."""
    view = memoryview(getattr(frame, "buffer", frame))
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def pixel_versions() -> dict[str, str]:
    """The versions that decide the pixel bytes; dispatcher and workers must agree on them."""
    import numba
    import PIL

    from augserver import __version__

    return {
        "augserver": __version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "numba": numba.__version__,
    }


def version_mismatch(mine: dict[str, str], theirs: dict[str, str]) -> str | None:
    """A sentence naming every version that differs, or None when they all agree."""
    diffs = [
        f"{name} {theirs.get(name, 'missing')} (dispatcher has {mine[name]})"
        for name in sorted(mine)
        if theirs.get(name) != mine[name]
    ]
    if not diffs:
        return None
    return "versions that decide pixel bytes differ: " + ", ".join(diffs)
