"""WebDataset shards on local disk: the index, ``augserver shard``, and the same pixels as the
source for the same (seed, epoch, index)."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augserver.cli import main
from augserver.config import config_from_dict
from augserver.datasets import WebDataset, open_dataset
from augserver.errors import DatasetError
from augserver.shards import ShardIndex, expand_braces, index_cache_dir, index_shard
from augserver.worker import Job, make_batch
from tests.service_helpers import make_image_folder, make_npz

pytestmark = pytest.mark.unit


def tar_bytes(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def png(seed: int, side: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUGSERVER_CACHE", str(tmp_path / "cache"))


def test_brace_patterns_expand_zero_padded() -> None:
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar",
                                                 "s-011.tar"]
    assert expand_braces("a{0..1}-{1..2}.tar") == ["a0-1.tar", "a0-2.tar", "a1-1.tar",
                                                   "a1-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="empty"):
        expand_braces("s-{3..1}.tar")


def test_a_shard_is_indexed_by_key_with_cls_or_json_labels() -> None:
    data = tar_bytes({"x/a.jpg": png(0), "x/a.cls": b"3\n", "b.png": png(1),
                      "b.json": json.dumps({"label": 1, "w": 5}).encode(), "b.txt": b"hi",
                      "notes.txt": b"not a sample"})
    samples = index_shard(data, "s.tar")
    assert [(k, e, lab) for k, e, _, _, lab, _ in samples] == [("x/a", "jpg", 3),
                                                                ("b", "png", 1)]
    _, _, offset, size, _, crc = samples[1]
    assert data[offset:offset + size] == png(1) and crc == zlib.crc32(png(1))


@pytest.mark.parametrize(("members", "problem"), [
    ({"a.png": png(0)}, "s.tar:a: no label"),
    ({"a.cls": b"1"}, "s.tar:a: no image"),
    ({"a.png": png(0), "a.cls": b"one"}, "s.tar:a.cls: unreadable label"),
])
def test_a_key_without_image_or_label_is_named(members: dict[str, bytes], problem: str) -> None:
    with pytest.raises(DatasetError, match=problem):
        index_shard(tar_bytes(members), "s.tar")


def test_shard_command_writes_shards_and_index_and_the_same_pixels(tmp_path: Path,
                                                                   capsys) -> None:
    source = make_image_folder(tmp_path, per_class=10, corrupt=False)
    dest = tmp_path / "out" / "train"
    assert main(["shard", f"imagefolder:{source}", str(dest), "--shard-size", "20kB"]) == 0
    assert "20 samples in" in capsys.readouterr().out
    shards = sorted(p.name for p in dest.parent.glob("train-*.tar"))
    assert len(shards) >= 2 and shards[0] == "train-000000.tar"
    original = open_dataset("imagefolder", source)
    sharded = open_dataset("webdataset", f"{dest}.index.json")
    assert isinstance(sharded, WebDataset)
    assert len(sharded) == len(original) and sharded.classes == original.classes
    for i in range(len(original)):
        assert sharded.encoded(i)[0] == original.encoded(i)[0]  # the files' own bytes
        assert sharded.label(i) == original.label(i)
    assert sharded.path(3).endswith("train-000000.tar:000000003.png")
    # the same (seed, epoch, index) gives the same bytes from the source and from the shards
    for fmt, path in (("imagefolder", str(source)), ("webdataset", f"{dest}.index.json")):
        config = config_from_dict({"dataset": {"format": fmt, "path": path},
                                   "preprocess": "imagenet"}, check_paths=False)
        dataset = open_dataset(fmt, path)
        arrays, failed = make_batch(Job(config, dataset, {}), 2, [0, 7, 19])
        assert failed == []
        if fmt == "imagefolder":
            expected = arrays
    for got, want in zip(arrays, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_arrays_become_png_and_decode_to_the_same_pixels(tmp_path: Path) -> None:
    npz = make_npz(tmp_path, n=24)
    dest = tmp_path / "npz" / "set"
    assert main(["shard", f"npz:{npz}", str(dest)]) == 0
    original, sharded = open_dataset("npz", npz), open_dataset("webdataset",
                                                               f"{dest}.index.json")
    for i in range(len(original)):
        np.testing.assert_array_equal(sharded.load(i), original.load(i))
    cfg = {"preprocess": "cifar"}
    a = make_batch(Job(config_from_dict({"dataset": {"format": "npz", "path": str(npz)},
                                          **cfg}, check_paths=False), original, {}), 1,
                   list(range(8)))[0]
    b = make_batch(Job(config_from_dict({"dataset": {"format": "webdataset",
                                                      "path": f"{dest}.index.json"}, **cfg},
                                         check_paths=False), sharded, {}), 1,
                   list(range(8)))[0]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_brace_pattern_is_indexed_once_and_cached(tmp_path: Path) -> None:
    for n in range(3):
        (tmp_path / f"p-{n:03d}.tar").write_bytes(tar_bytes({
            f"k{n}{j}.png": png(n * 10 + j) for j in range(2)} | {
            f"k{n}{j}.cls": str(j).encode() for j in range(2)}))
    pattern = str(tmp_path / "p-{000..002}.tar")
    first = open_dataset("webdataset", pattern)
    assert len(first) == 6 and first.classes == ["0", "1"]
    assert len(list(index_cache_dir().glob("*.json"))) == 1
    again = open_dataset("webdataset", pattern)
    assert again.fingerprint() == first.fingerprint()
    (tmp_path / "p-001.tar").write_bytes(tar_bytes({"z.png": png(99), "z.cls": b"0"}))
    changed = open_dataset("webdataset", pattern)  # a different size: indexed afresh
    assert len(changed) == 5 and changed.fingerprint() != first.fingerprint()


def test_missing_truncated_and_corrupt_shards_are_named(tmp_path: Path) -> None:
    source = make_image_folder(tmp_path, per_class=4, corrupt=False)
    dest = tmp_path / "s" / "d"
    assert main(["shard", f"imagefolder:{source}", str(dest), "--shard-size", "8kB"]) == 0
    index = f"{dest}.index.json"
    shard0 = dest.parent / "d-000000.tar"
    data = shard0.read_bytes()
    shard0.write_bytes(data[:-2000])
    with pytest.raises(DatasetError, match=r"d-000000\.tar.*index says.*truncated"):
        open_dataset("webdataset", index)
    shard0.unlink()
    with pytest.raises(DatasetError, match=r"d-000000\.tar.*shard unavailable"):
        open_dataset("webdataset", index)
    # a member whose bytes are garbage fails that sample only, named by shard and key
    broken = bytearray(data)
    entry = ShardIndex.from_json(Path(index).read_bytes(), index)
    start = int(entry.offset[1])
    broken[start:start + 64] = b"\0" * 64
    shard0.write_bytes(bytes(broken))
    dataset = open_dataset("webdataset", index)
    with pytest.raises(DatasetError, match=r"d-000000\.tar:000000001\.png"):
        dataset.load(1)
    assert dataset.load(0).shape == (32, 32, 3)
    with pytest.raises(DatasetError, match="not a valid shard index"):
        ShardIndex.from_json(b'{"format": "something else"}', "x.index.json")


def _swap_images(data: bytes, index: ShardIndex, a: int, b: int) -> bytes:
    """The shard's bytes with images ``a`` and ``b`` swapped, each kept at the other's offset:
    the same length, valid images, other pixels (only when both have the same size)."""
    out = bytearray(data)
    sa, sb = slice(int(index.offset[a]), int(index.offset[a] + index.size[a])), \
        slice(int(index.offset[b]), int(index.offset[b] + index.size[b]))
    out[sa], out[sb] = data[sb], data[sa]
    return bytes(out)


def test_content_rewritten_with_its_length_kept_is_an_error_never_other_pixels(
        tmp_path: Path) -> None:
    """Other valid images at the same offsets (and garbage of the same length) used to decode
    as valid samples under the old labels; the index's CRC-32 of each image catches both."""
    from augserver.shards import ShardWriter
    from augserver.storage import LocalStore

    dest = str(tmp_path / "d")
    writer = ShardWriter(LocalStore(), dest, 1 << 20, ["a", "b"])
    for i in range(4):
        writer.add(f"{i:03d}", "png", png(i % 2), i % 2)  # two images of each size
    index = writer.close()
    assert index.crc is not None and len(index.crc) == 4
    shard = tmp_path / "d-000000.tar"
    data = shard.read_bytes()
    assert index.size[0] == index.size[2]  # png(0) twice: same size, same bytes
    shard.write_bytes(_swap_images(data, index, 1, 2))  # len kept, images 1 and 2 swapped
    assert len(shard.read_bytes()) == len(data)
    dataset = open_dataset("webdataset", f"{dest}.index.json")
    with pytest.raises(DatasetError, match=r"d-000000\.tar:001\.png.*differ from the shard "
                                           r"index"):
        dataset.load(1)
    assert dataset.load(0).shape == (40, 40, 3)  # the others still read
    garbage = bytearray(data)
    start = int(index.offset[3])
    garbage[start + 40:start + 48] = b"\x01" * 8  # same length, a few bytes changed
    shard.write_bytes(bytes(garbage))
    dataset = open_dataset("webdataset", f"{dest}.index.json")
    with pytest.raises(DatasetError, match=r"003\.png.*differ"):
        dataset.load(3)


def test_a_version_1_index_still_loads_without_the_content_check(tmp_path: Path) -> None:
    source = make_image_folder(tmp_path, per_class=2, corrupt=False)
    dest = tmp_path / "s" / "d"
    assert main(["shard", f"imagefolder:{source}", str(dest)]) == 0
    path = Path(f"{dest}.index.json")
    raw = json.loads(path.read_bytes())
    assert raw["version"] == 2 and len(raw["samples"]["crc"]) == 4
    raw["version"] = 1
    del raw["samples"]["crc"]
    path.write_text(json.dumps(raw))
    dataset = open_dataset("webdataset", str(path))
    assert dataset.index.crc is None and dataset.load(0).shape == (32, 32, 3)
