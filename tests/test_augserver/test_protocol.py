"""augserver.protocol: frames, zero-copy arrays, and every validation error."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from augserver import protocol
from augserver.protocol import ProtocolError, decode, encode, relay

pytestmark = pytest.mark.unit

V = protocol.PROTOCOL_VERSION  # the version this side speaks


def header(mtype: str = "ping", arrays: list[Any] | None = None, **fields: Any) -> bytes:
    return msgpack.packb(
        {"v": V, "t": mtype, "arrays": arrays or [], **fields}
    )


def result_arrays(n: int = 2) -> list[np.ndarray]:
    views = np.arange(3 * n * 4 * 4 * 3, dtype=np.uint8).reshape(3, n, 4, 4, 3)
    return [views, np.arange(n, dtype=np.int64), np.arange(10, 10 + n, dtype=np.int64)]


def test_round_trip_keeps_fields_and_arrays() -> None:
    arrays = result_arrays()
    message = decode(encode("result", arrays, task=5, failed=[[3, "a.png", "bad"]]))
    assert message.type == "result"
    assert message.fields == {"task": 5, "failed": [[3, "a.png", "bad"]], "slot": "none"}
    assert message["task"] == 5
    for got, sent in zip(message.arrays, arrays, strict=True):
        assert got.dtype == sent.dtype and np.array_equal(got, sent)


def test_encode_does_not_copy_and_decode_views_the_frame() -> None:
    views = result_arrays()[0]
    frames = encode("result", [views], task=0, failed=[])
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), views)
    buffer = bytearray(bytes(frames[1]))
    decoded = decode([frames[0], buffer]).arrays[0]
    buffer[0] = 255
    assert decoded.flat[0] == 255  # a view of the received buffer, not a copy


def test_zero_copy_over_a_real_socket() -> None:
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        a.bind("inproc://protocol-test")
        b.connect("inproc://protocol-test")
        arrays = result_arrays(64)
        a.send_multipart(encode("result", arrays, task=1, failed=[]), copy=False)
        frames = b.recv_multipart(copy=False)
        message = decode(frames)
        assert np.array_equal(message.arrays[0], arrays[0])
        assert np.shares_memory(message.arrays[0], np.frombuffer(frames[1].buffer, np.uint8))
    finally:
        a.close(linger=0)
        b.close(linger=0)
        context.term()


def test_relay_forwards_the_received_frames_under_a_new_header() -> None:
    arrays = result_arrays(3)
    result = decode(encode("result", arrays, task=4, failed=[]))
    frames = relay("batch", result, {"stream": "s", "position": 2, "failed": []})
    assert frames[1:] == result.frames and all(
        a is b for a, b in zip(frames[1:], result.frames, strict=True)
    )
    batch = decode(frames)
    assert (batch.type, batch["position"]) == ("batch", 2)
    for got, sent in zip(batch.arrays, arrays, strict=True):
        assert got.dtype == sent.dtype and np.array_equal(got, sent)
    assert [(d.str, s) for d, s in batch.specs] == [("|u1", (3, 3, 4, 4, 3)), ("<i8", (3,)),
                                                   ("<i8", (3,))]


def test_non_contiguous_arrays_are_sent_contiguous_and_empty_arrays_work() -> None:
    base = np.arange(24, dtype=np.int64).reshape(4, 6)
    message = decode(encode("ping", [base[:, ::2], np.empty((0, 3), np.uint8)]))
    assert np.array_equal(message.arrays[0], base[:, ::2])
    assert message.arrays[1].shape == (0, 3)


def test_encode_refuses_bad_fields_and_dtypes() -> None:
    with pytest.raises(ProtocolError, match="dtype"):
        encode("ping", [np.zeros(2, np.float64)])
    with pytest.raises(ProtocolError, match="unknown message type"):
        encode("launch")
    with pytest.raises(ProtocolError, match="'n'"):
        encode("credit", stream="s", n=0)


@pytest.mark.parametrize(
    ("frames", "problem"),
    [
        ([], "empty message"),
        ([b"\xc1"], "not valid msgpack"),
        ([msgpack.packb([1, 2])], "must be a map"),
        ([msgpack.packb({"v": 7, "t": "ping", "arrays": []})], "protocol version 7"),
        ([msgpack.packb({"t": "ping", "arrays": []})], "protocol version None"),
        ([header("launch")], "unknown message type 'launch'"),
        ([header("credit", stream="s")], r"missing fields \['n'\]"),
        ([header("ping", junk=1)], r"unexpected fields \['junk'\]"),
        ([header("credit", stream="s", n="1")], "invalid value for field 'n'"),
        ([header("credit", stream="s", n=True)], "invalid value for field 'n'"),
        ([header("credit", stream="s", n=0)], "invalid value for field 'n'"),
        ([header("ready", slots=-1, dataset={})], "invalid value for field 'slots'"),
        ([header("hello", role="admin", protocol=1, versions={}, name="x")], "'role'"),
        ([header("hello", role="worker", protocol=1, versions={"a": 1}, name="x")],
         "'versions'"),
        ([header("open", stream="s", epoch=0, rank=0, world_size=1, ordered=False,
                 credits=1, done=[[3, 2]], skip=None)], "'done'"),
        ([header("result", task=0, failed=[[1, "p"]])], "'failed'"),
        ([header("error", message="m", stream=3, fatal=False)], "'stream'"),
        ([header("task", task=0, epoch=0, indices=[1, -2])], "'indices'"),
        ([msgpack.packb({"v": V, "t": "ping", "arrays": "x"})], "'arrays' must be a list"),
        ([header("ping", [["|u1", [1]]] * 9), *[b"x"] * 9], "at most 8"),
        ([header("ping", [["|u1", [1]]])], "describes 1 arrays but 0 frames"),
        ([header("ping"), b"x"], "describes 0 arrays but 1 frames"),
        ([header("ping", [["|O", [1]]]), b"x"], "badly described"),
        ([header("ping", [["<f8", [1]]]), bytes(8)], "badly described"),
        ([header("ping", [["|u1", [-1]]]), b""], "badly described"),
        ([header("ping", [["|u1"]]), b""], "badly described"),
        ([header("ping", [["<i8", [2]]]), bytes(15)], "16 bytes"),
        ([msgpack.packb({"v": V, "t": "ping", "arrays": [], "x": msgpack.ExtType(3, b"")})],
         "extension type 3"),
        ([msgpack.packb({1: 2, "v": V, "t": "ping", "arrays": []})], "not valid msgpack"),
        ([header("ping", pad="x" * protocol.MAX_HEADER_BYTES)], "exceeds"),
    ],
)
def test_decode_rejects(frames: list[bytes], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode(frames)


def test_timestamps_are_not_decoded_into_objects() -> None:
    stamp = msgpack.packb({"v": V, "t": "ping", "arrays": [], "x": msgpack.Timestamp(1, 0)},
                          datetime=False)
    with pytest.raises(ProtocolError):
        decode([stamp])


def test_version_helpers_name_what_differs() -> None:
    versions = protocol.pixel_versions()
    assert set(versions) == {"augserver", "numpy", "pillow", "numba"}
    assert protocol.version_mismatch(versions, dict(versions)) is None
    text = protocol.version_mismatch(versions, {**versions, "pillow": "9.0"})
    assert text is not None and "pillow 9.0" in text and versions["pillow"] in text
    assert "numba missing" in str(protocol.version_mismatch(
        versions, {k: v for k, v in versions.items() if k != "numba"}))
