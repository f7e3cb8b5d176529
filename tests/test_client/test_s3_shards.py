"""WebDataset shards in a real S3-compatible store (SeaweedFS): an epoch with a worker killed,
the same stream as local shards and as the source folder, and the store's failures named."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from augserver.cli import main
from augserver.datasets import open_dataset
from augserver.errors import DatasetError
from augserver.storage import S3Options
from client import RemoteAugMixLoader, RemoteError
from tests.object_store import seaweedfs
from tests.service_helpers import make_image_folder, wait_workers
from tests.service_helpers import write_config as _write_config
from tests.test_client.test_loader import Processes, collect, free_address, indices, stream_hash

pytestmark = [pytest.mark.service, pytest.mark.slow]

BUCKET = "augserver-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), BUCKET) as running:
        yield running


@pytest.fixture()
def aws(store, monkeypatch: pytest.MonkeyPatch):
    for name, value in store.env().items():
        monkeypatch.setenv(name, value)
    return store


def serve_epoch(tmp: Path, procs: Processes, fmt: str, path: str, kill_after: int | None = None,
                workers: int = 2, resume_after: int | None = None, **keys: object) -> list:
    """One ordered epoch of a job over ``path`` with ``workers`` worker processes; with
    ``kill_after``, one worker is SIGKILLed after that many batches; with ``resume_after``, a
    new loader resumes from the first one's state after that many batches."""
    config = _write_config(tmp, path, fmt, preprocess="cifar", batch_size=4, seed=3,
                           **keys)
    address = free_address()
    procs.serve(config, address)
    started = [procs.worker(address) for _ in range(workers)]
    wait_workers(address, workers, timeout=60)
    loader = RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False)
    if kill_after is None and resume_after is None:
        return collect(loader)
    head = collect(loader, stop_after=kill_after or resume_after)
    if kill_after is not None:
        procs.kill(started[0])
        return head + collect(loader)
    resumed = RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False)
    resumed.load_state_dict(loader.state_dict())
    return head + collect(resumed)


def test_an_epoch_from_s3_with_a_worker_killed_matches_local_shards_and_the_source(
    tmp_path: Path, aws, procs: Processes
) -> None:
    source = make_image_folder(tmp_path, per_class=12, corrupt=False)
    assert main(["shard", f"imagefolder:{source}", f"s3://{BUCKET}/job1/train",
                 "--shard-size", "16kB"]) == 0
    local = tmp_path / "local" / "train"
    assert main(["shard", f"imagefolder:{source}", str(local), "--shard-size", "16kB"]) == 0

    from_s3 = serve_epoch(tmp_path / "a", procs, "webdataset",
                          f"s3://{BUCKET}/job1/train.index.json", kill_after=2)
    assert sorted(indices(from_s3)) == list(range(24))  # exactly once, a worker killed
    from_disk = serve_epoch(tmp_path / "b", procs, "webdataset", f"{local}.index.json",
                            workers=1, resume_after=3)  # another worker count, resumed
    from_folder = serve_epoch(tmp_path / "c", procs, "imagefolder", str(source))
    assert stream_hash(from_s3) == stream_hash(from_disk) == stream_hash(from_folder)


def test_shards_over_plain_http_read_by_range(tmp_path: Path, aws) -> None:
    """The same shards through SeaweedFS's filer, a plain HTTP server: index, ranges, and a
    missing shard named."""
    source = make_image_folder(tmp_path, per_class=5, corrupt=False)
    assert main(["shard", f"imagefolder:{source}", f"s3://{BUCKET}/web/d",
                 "--shard-size", "8kB"]) == 0
    url = f"{aws.filer}/buckets/{BUCKET}/web/d.index.json"
    over_http = open_dataset("webdataset", url)
    original = open_dataset("imagefolder", source)
    assert len(over_http) == 10 and over_http.path(0).startswith(f"{aws.filer}/buckets/")
    over_http.prefetch(range(10))
    for i in range(10):
        np.testing.assert_array_equal(over_http.load(i), original.load(i))
    aws.client().delete_object(Bucket=BUCKET, Key="web/d-000000.tar")
    with pytest.raises(DatasetError, match=r"web/d-000000\.tar.*404"):
        open_dataset("webdataset", url)


def test_shard_and_serve_find_credentials_in_a_profile(
    tmp_path: Path, aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only AWS_PROFILE and the shared files, as an AWS user would have them."""
    from tests.object_store import ACCESS_KEY, SECRET_KEY

    (tmp_path / "credentials").write_text(
        f"[lab]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    (tmp_path / "config").write_text(
        f"[profile lab]\nregion = us-east-1\nendpoint_url = {aws.endpoint}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "AWS_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    source = make_image_folder(tmp_path, per_class=3, corrupt=False)
    assert main(["shard", f"imagefolder:{source}", f"s3://{BUCKET}/profile/d"]) == 0
    assert len(open_dataset("webdataset", f"s3://{BUCKET}/profile/d.index.json")) == 6


def test_missing_truncated_and_forbidden_shards_name_the_object(tmp_path: Path, aws) -> None:
    source = make_image_folder(tmp_path, per_class=4, corrupt=False)
    prefix = f"s3://{BUCKET}/job2/d"
    assert main(["shard", f"imagefolder:{source}", prefix, "--shard-size", "8kB"]) == 0
    index = f"{prefix}.index.json"
    assert len(open_dataset("webdataset", index)) == 8
    client = aws.client()
    body = client.get_object(Bucket=BUCKET, Key="job2/d-000001.tar")["Body"].read()
    client.put_object(Bucket=BUCKET, Key="job2/d-000001.tar", Body=body[:-1024])
    with pytest.raises(DatasetError, match=r"s3://augserver-test/job2/d-000001\.tar.*index "
                                           r"says"):
        open_dataset("webdataset", index)
    client.delete_object(Bucket=BUCKET, Key="job2/d-000001.tar")
    with pytest.raises(DatasetError, match=r"job2/d-000001\.tar.*no such object \(404\)"):
        open_dataset("webdataset", index)
    with pytest.raises(DatasetError, match=r"job2/nothing\.index\.json.*404"):
        open_dataset("webdataset", f"s3://{BUCKET}/job2/nothing.index.json")


def test_wrong_credentials_stop_serve_with_the_object_and_the_reason(
    tmp_path: Path, aws, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    source = make_image_folder(tmp_path, per_class=2, corrupt=False)
    assert main(["shard", f"imagefolder:{source}", f"s3://{BUCKET}/job3/d"]) == 0
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    config = _write_config(tmp_path, f"s3://{BUCKET}/job3/d.index.json", "webdataset",
                           preprocess="cifar")
    assert main(["serve", "--config", str(config), "--bind", free_address()]) != 0
    err = capsys.readouterr().err
    assert "s3://augserver-test/job3/d.index.json" in err and "access denied (403)" in err
    # the job's own endpoint wins over the environment's
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws.env()["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    dataset = open_dataset("webdataset", f"s3://{BUCKET}/job3/d.index.json",
                           s3=S3Options(endpoint_url=aws.endpoint))
    assert len(dataset) == 4


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_the_store_going_away_mid_epoch_fails_the_stream_naming_the_shard(
    tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """Reads are retried (5 tries, about 3 s); then the stream fails naming the shard, also
    under skip: with the store gone no stand-in can be read, so none is tried."""
    with seaweedfs(tmp_path / "own-store", "gone-test") as own:
        for name, value in own.env().items():
            monkeypatch.setenv(name, value)
        source = make_image_folder(tmp_path, per_class=12, corrupt=False)
        assert main(["shard", f"imagefolder:{source}", "s3://gone-test/t/d"]) == 0
        config = _write_config(tmp_path, "s3://gone-test/t/d.index.json", "webdataset",
                               preprocess="cifar", batch_size=4, error_policy=policy)
        address = free_address()
        procs.serve(config, address)
        procs.worker(address)
        wait_workers(address, 1, timeout=60)
        loader = RemoteAugMixLoader(address, prefetch=1, timeout=60, normalize=False)
        it = iter(loader)
        next(it)
        own.kill()
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"s3://gone-test/t/d-000000\.tar:.*after 5 tries"):
            for _ in it:
                pass
        assert time.monotonic() - start < 30


def test_a_shard_object_rewritten_with_its_length_kept_is_named_not_served(
        tmp_path: Path, aws) -> None:
    """The object rewritten in the real store with other bytes of the same length: the
    sample whose bytes changed is an error naming the object and the key."""
    source = make_image_folder(tmp_path, per_class=4, corrupt=False)
    prefix = f"s3://{BUCKET}/job-crc/d"
    assert main(["shard", f"imagefolder:{source}", prefix]) == 0
    index = f"{prefix}.index.json"
    dataset = open_dataset("webdataset", index)
    client = aws.client()
    body = bytearray(client.get_object(Bucket=BUCKET, Key="job-crc/d-000000.tar")["Body"].read())
    start = int(dataset.index.offset[2])
    body[start + 60:start + 68] = bytes(8)  # same length, other content
    client.put_object(Bucket=BUCKET, Key="job-crc/d-000000.tar", Body=bytes(body))
    dataset = open_dataset("webdataset", index)
    with pytest.raises(DatasetError, match=r"s3://augserver-test/job-crc/d-000000\.tar:"
                                           r"\S+\.png.*differ from the shard index"):
        dataset.load(2)
    assert dataset.load(0).shape == (32, 32, 3)
