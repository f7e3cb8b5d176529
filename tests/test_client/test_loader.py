"""RemoteAugMixLoader end to end: real dispatcher and worker processes on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augserver.augmix import AugMixConfig, augmix_views, sample_rng
from augserver.cli import main as augserver_main
from augserver.datasets import open_dataset
from augserver.plan import ShardPlan
from augserver.preprocessing import preprocess
from augserver.stats import DispatcherStats
from augserver.status import request_status
from client import AugMixBatch, RemoteAugMixLoader, RemoteError, jsd_loss_from_concat
from tests.service_helpers import (
    REPO,
    dispatcher_thread,
    end_process,
    free_port,
    job,
    make_image_folder,
    make_npz,
    spawn,
    wait_workers,
    worker_threads,
)
from tests.service_helpers import write_config as _write_config

pytestmark = pytest.mark.service

N = 48  # samples; batch 8 -> 6 batches per epoch on one rank


def job_config(tmp: Path, n: int = N, batch_size: int = 8, **keys: object) -> Path:
    """A job over ``n`` random 32x32 images, seed 0, fast heartbeats (dead after 0.6 s)."""
    return _write_config(tmp, make_npz(tmp, n), batch_size=batch_size, seed=0, **keys)


def free_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


class Processes:
    """``augserver serve`` / ``worker`` subprocesses, every one ended by :meth:`close`."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def serve(self, config: Path, address: str, workers: int = 0) -> subprocess.Popen:
        args = ["serve", "--config", str(config), "--bind", address, "--workers", str(workers)]
        return self._spawn(args)

    def worker(self, address: str) -> subprocess.Popen:
        return self._spawn(["worker", "--connect", address, "--log-level", "WARNING"])

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        proc = spawn([*args, "--log-level", "WARNING"] if args[0] == "serve" else args)
        self.started.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.started:
            end_process(proc)


def collect(loader: RemoteAugMixLoader, stop_after: int | None = None) -> list[AugMixBatch]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if stop_after is not None and len(batches) == stop_after:
            break
    return batches


def indices(batches: list[AugMixBatch]) -> list[int]:
    return [int(i) for b in batches for i in b.index]


def stream_hash(batches: list[AugMixBatch]) -> str:
    digest = hashlib.sha256()
    for b in batches:
        for t in (b.orig, b.aug1, b.aug2, b.target, b.index):
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_epoch_exactly_once_with_two_workers_and_exact_bytes(tmp_path, procs):
    config = job_config(tmp_path, N)
    address = free_address()
    procs.serve(config, address, workers=2)
    loader = RemoteAugMixLoader(address, prefetch=3, timeout=60, normalize=False)
    assert len(loader) == 6
    batches = collect(loader)
    plan = ShardPlan(0, 0, N, 0, 1, 8)
    assert sorted(indices(batches)) == sorted(plan.indices.tolist())
    assert len(indices(batches)) == N, "a sample arrived twice"
    first = batches[0]
    assert first.orig.shape == (8, 3, 32, 32) and first.orig.dtype == torch.uint8
    # every byte is the kernel's output for (seed, epoch, index), whoever made it
    data = np.load(tmp_path / "data.npz")
    for row, i in enumerate(first.index.tolist()):
        rng = sample_rng(0, 0, i)
        image = preprocess("cifar", data["x"][i], rng)
        views = augmix_views(image, rng, AugMixConfig(severity=3), 2)
        assert np.array_equal(first.orig[row].permute(1, 2, 0).numpy(), image)
        assert np.array_equal(first.aug1[row].permute(1, 2, 0).numpy(), views[0])
        assert np.array_equal(first.aug2[row].permute(1, 2, 0).numpy(), views[1])
        assert int(first.target[row]) == int(data["y"][i])


def test_normalised_float_views_and_concat(tmp_path, procs):
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=1)
    loader = RemoteAugMixLoader(address, timeout=60)
    batch = next(iter(loader))
    assert batch.orig.dtype == torch.float32 and batch.orig.shape == (8, 3, 32, 32)
    assert float(batch.aug1.min()) >= -1.0 and float(batch.aug1.max()) <= 1.0  # CIFAR 0.5/0.5
    assert batch.concat().shape == (24, 3, 32, 32)
    raw = RemoteAugMixLoader(address, timeout=60, normalize=False, ordered=True)
    norm = RemoteAugMixLoader(address, timeout=60, ordered=True)
    a, b = next(iter(raw)), next(iter(norm))
    assert torch.allclose(b.orig, (a.orig.float() / 255 - 0.5) / 0.5, atol=1e-6)


def test_single_view_without_jsd(tmp_path, procs):
    address = free_address()
    procs.serve(job_config(tmp_path, N, jsd=False), address, workers=1)
    batch = next(iter(RemoteAugMixLoader(address, timeout=60)))
    assert batch.orig is None and batch.aug2 is None
    assert batch.aug1.shape == (8, 3, 32, 32) and batch.concat().shape == (8, 3, 32, 32)
    raw = next(iter(RemoteAugMixLoader(address, timeout=60, normalize=False)))
    data = np.load(tmp_path / "data.npz")
    for row, i in enumerate(raw.index.tolist()):  # the one view is the kernel's first view
        rng = sample_rng(0, 0, i)
        image = preprocess("cifar", data["x"][i], rng)
        [view] = augmix_views(image, rng, AugMixConfig(severity=3), 1)
        assert np.array_equal(raw.aug1[row].permute(1, 2, 0).numpy(), view)
        assert int(raw.target[row]) == int(data["y"][i])


def test_plain_preprocessed_view_with_augment_none(tmp_path, procs):
    address = free_address()
    procs.serve(job_config(tmp_path, N, augment="none"), address, workers=1)
    batch = next(iter(RemoteAugMixLoader(address, timeout=60, normalize=False)))
    assert batch.aug1 is None and batch.aug2 is None and batch.concat() is batch.orig
    data = np.load(tmp_path / "data.npz")
    for row, i in zip(batch.orig, batch.index.tolist(), strict=True):
        # the same crop and flip as the clean view of an AugMix job: only the preprocessing
        expected = preprocess("cifar", data["x"][i], sample_rng(0, 0, i))
        assert np.array_equal(row.permute(1, 2, 0).numpy(), expected)


def test_worker_killed_mid_epoch_nothing_missing_nothing_twice(tmp_path, procs):
    address = free_address()
    procs.serve(job_config(tmp_path, 96), address)
    workers = [procs.worker(address), procs.worker(address)]
    wait_workers(address, 2)
    # The stopped worker takes its share of the first tasks and never answers; after it
    # misses its heartbeats its tasks are re-issued, and it is then killed outright.
    workers[0].send_signal(signal.SIGSTOP)
    loader = RemoteAugMixLoader(address, prefetch=4, timeout=60)
    seen: list[int] = []
    for step, batch in enumerate(loader):
        seen += batch.index.tolist()
        if step == 2:
            Processes.kill(workers[0])
    assert sorted(seen) == sorted(ShardPlan(0, 0, 96, 0, 1, 8).indices.tolist())
    assert len(seen) == len(set(seen)) == 96
    assert _status(address).counters.tasks_reissued >= 1


def test_ordered_stream_is_identical_for_any_worker_count_and_failures(tmp_path, procs):
    config = job_config(tmp_path, N)
    hashes = []
    for workers, kill in ((1, False), (3, False), (3, True)):
        address = free_address()
        server = procs.serve(config, address)
        started = [procs.worker(address) for _ in range(workers)]
        wait_workers(address, workers)
        if kill:
            # A stopped worker takes its share of the first tasks and never answers: its
            # tasks are re-issued once it misses its heartbeats, then it is killed outright.
            started[0].send_signal(signal.SIGSTOP)
        loader = RemoteAugMixLoader(address, ordered=True, prefetch=6, timeout=60,
                                    normalize=False)  # fmt: skip
        batches = []
        for batch in loader:
            batches.append(batch)
            if kill and len(batches) == 2:
                Processes.kill(started[0])
        assert [int(b.index[0]) for b in batches] == [
            int(ShardPlan(0, 0, N, 0, 1, 8).batch(p)[0]) for p in range(6)
        ], "ordered mode must follow the plan order"
        if kill:
            assert _status(address).counters.tasks_reissued >= 1
        hashes.append(stream_hash(batches))
        Processes.kill(server)
    assert hashes[0] == hashes[1] == hashes[2]


def test_resume_at_start_middle_and_end_of_epoch(tmp_path, procs):
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    full = set(ShardPlan(0, 3, N, 0, 1, 8).indices.tolist())

    # step 0: a state taken before iterating resumes the whole epoch
    loader = RemoteAugMixLoader(address, epoch=3, timeout=60)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = RemoteAugMixLoader(address, timeout=60)
    resumed.load_state_dict(state)
    assert set(indices(collect(resumed))) == full

    # mid-epoch: no replay, no gap (the resumed loader may have another prefetch)
    loader = RemoteAugMixLoader(address, epoch=3, timeout=60)
    head = collect(loader, stop_after=2)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = RemoteAugMixLoader(address, prefetch=1, timeout=60)
    resumed.load_state_dict(state)
    tail = collect(resumed)
    assert len(tail) == 4
    assert sorted(indices(head) + indices(tail)) == sorted(full)

    # exactly at the epoch end: nothing is replayed, the next iteration is the next epoch
    loader = RemoteAugMixLoader(address, epoch=3, timeout=60)
    collect(loader)
    state = loader.state_dict()
    resumed = RemoteAugMixLoader(address, timeout=60)
    resumed.load_state_dict(state)
    following = collect(resumed)
    assert resumed.epoch == 4 and len(following) == 6
    assert sorted(indices(following)) == sorted(ShardPlan(0, 4, N, 0, 1, 8).indices.tolist())
    # a trainer that resumes there and sets the epoch it saved gets nothing of it again
    resumed = RemoteAugMixLoader(address, timeout=60)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert collect(resumed) == []
    resumed.set_epoch(4)
    assert len(collect(resumed)) == 6


def test_a_plain_loop_without_set_epoch_moves_to_the_next_epoch(tmp_path, procs):
    """``for epoch in range(E): for batch in loader`` (and Lightning's fit loop) never call
    set_epoch: each completed pass is followed by the next epoch, not a replay of epoch 0."""
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    loader = RemoteAugMixLoader(address, ordered=True, timeout=60)
    seen = []
    for _epoch in range(3):
        seen.append(indices(collect(loader)))
    assert loader.epoch == 2
    for epoch, got in enumerate(seen):
        assert got == ShardPlan(0, epoch, N, 0, 1, 8).indices.tolist()
    # a pass broken off mid-epoch continues that epoch, then the next one follows
    head = indices(collect(loader, stop_after=2))
    tail = indices(collect(loader))
    assert loader.epoch == 3 and head + tail == ShardPlan(0, 3, N, 0, 1, 8).indices.tolist()
    assert len(collect(loader)) == 6 and loader.epoch == 4


def test_lightning_fit_gets_a_new_epoch_every_epoch(tmp_path, procs):
    """Lightning's fit loop iterates the loader once per epoch and never calls set_epoch:
    each of its epochs must be the plan's next epoch, exactly once each index."""
    lightning = pytest.importorskip("lightning")
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    loader = RemoteAugMixLoader(address, ordered=True, timeout=60)
    seen: dict[int, list[int]] = {}

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3 * 32 * 32, loader.num_classes)

        def training_step(self, batch: AugMixBatch, _: int) -> torch.Tensor:
            seen.setdefault(self.current_epoch, []).extend(batch.index.tolist())
            logits = self.head(batch.concat().flatten(1))
            return jsd_loss_from_concat(logits, batch.target)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    trainer.fit(Tiny(), train_dataloaders=loader)
    assert sorted(seen) == [0, 1, 2]
    for epoch, got in seen.items():
        assert got == ShardPlan(0, epoch, N, 0, 1, 8).indices.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_the_lightning_example_fits_single_process_and_ddp_on_gloo(tmp_path, procs, devices):
    """client.programs.lightning_example: a LightningDataModule around RemoteAugMixLoader;
    with 2 devices Lightning's DDP (gloo on CPU) gives each rank its share, equal per rank."""
    pytest.importorskip("lightning")
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    logs = tmp_path / "idx"
    done = subprocess.run(
        [sys.executable, "-m", "client.programs.lightning_example", "--connect", address,
         "--epochs", "2", "--devices", str(devices), "--index-log", str(logs)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert re.findall(r"epoch (\d): mean loss \d+\.\d+ over", done.stdout) == ["1", "2"], \
        done.stdout  # one loss line an epoch, from rank 0 alone
    per_rank = [[line.split() for line in (logs / f"rank{r}.txt").read_text().splitlines()]
                for r in range(devices)]
    steps = N // 8 // devices  # 48 samples, batch 8
    for lines in per_rank:
        assert [int(epoch) for epoch, _ in lines] == [0] * steps + [1] * steps
        assert all(int(n) == 8 for _, n in lines)


def test_ordered_resume_continues_the_same_stream(tmp_path, procs):
    """Over TCP (tests/test_client/test_shared_memory.py resumes through shared memory)."""
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    whole = collect(RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False,
                                       shm=False))
    loader = RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False, shm=False)
    head = collect(loader, stop_after=3)
    resumed = RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False,
                                 shm=False)
    resumed.load_state_dict(loader.state_dict())
    assert stream_hash(head + collect(resumed)) == stream_hash(whole)


def test_dispatcher_restart_mid_epoch(tmp_path, procs):
    """Over TCP (tests/test_client/test_shared_memory.py restarts it under shared memory)."""
    config = job_config(tmp_path, 96)
    address = free_address()
    server = procs.serve(config, address)
    procs.worker(address)
    procs.worker(address)
    loader = RemoteAugMixLoader(address, prefetch=2, timeout=90, liveness=2.0, shm=False)
    seen: list[int] = []
    for step, batch in enumerate(loader):
        seen += batch.index.tolist()
        if step == 3:
            Processes.kill(server)
            time.sleep(0.5)
            server = procs.serve(config, address)  # same port: workers and client come back
    assert sorted(seen) == sorted(ShardPlan(0, 0, 96, 0, 1, 8).indices.tolist())


def test_client_started_before_the_dispatcher(tmp_path, procs):
    address = free_address()
    result: dict[str, object] = {}

    def train() -> None:
        try:
            result["indices"] = indices(collect(RemoteAugMixLoader(address, timeout=60)))
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    time.sleep(1.5)
    procs.serve(job_config(tmp_path, N), address, workers=1)
    thread.join(timeout=90)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert sorted(result["indices"]) == sorted(ShardPlan(0, 0, N, 0, 1, 8).indices.tolist())


def test_slow_consumer_holds_memory_bounded(tmp_path, procs):
    address = free_address()
    procs.serve(job_config(tmp_path, 96), address, workers=2)
    loader = RemoteAugMixLoader(address, prefetch=2, timeout=60)
    peaks = []
    consumed = 0
    for _batch in loader:
        consumed += 1
        time.sleep(0.3)  # a slow training step: workers must wait, nothing piles up
        status = _status(address)
        for client in status.clients:
            for s in client.streams:
                peaks.append(s.in_flight + s.credits)
        produced = sum(w.tasks_done for w in status.workers)
        assert produced <= consumed + 2, "workers ran ahead of the granted credits"
    assert consumed == 12
    assert peaks and max(peaks) <= 2


def _status(address: str) -> DispatcherStats:
    return request_status(address, timeout=10)


def test_server_errors_surface_in_the_training_process(tmp_path, procs):
    data = np.load(make_npz(tmp_path, 8))
    folder = tmp_path / "folder"
    (folder / "a").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(data["x"][i]).save(folder / "a" / f"{i}.png")
    (folder / "a" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = _write_config(
        tmp_path, folder, fmt="imagefolder", batch_size=9, error_policy="fail"
    )
    address = free_address()
    procs.serve(config, address, workers=1)
    with pytest.raises(RemoteError, match=r"9_broken\.png"):
        collect(RemoteAugMixLoader(address, timeout=60))


def run_ranks(address: str, out: Path, world: int = 2, stop_after: int | None = None,
              resume: Path | None = None) -> list[dict]:
    """``world`` ranks of a real torch.distributed (gloo) job, each iterating one epoch of the
    loader (or ``stop_after`` batches of it) with an all-reduce per batch; their reports."""
    out.mkdir(parents=True, exist_ok=True)
    init = f"file://{out / 'dist-init'}"
    script = REPO / "tests" / "distributed_rank.py"
    extra = ["-" if stop_after is None else str(stop_after)]
    extra += [str(resume)] if resume is not None else []
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), address, init, str(rank), str(world), str(out),
             *extra],
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        for rank in range(world)
    ]
    for proc in ranks:
        assert proc.wait(timeout=120) == 0
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def run_two_ranks(address: str, tmp_path: Path) -> list[dict]:
    return run_ranks(address, tmp_path)


@pytest.mark.parametrize(("old", "new"), [(4, 2), (2, 3)])
def test_an_epoch_resumes_elastically_on_another_world_size(tmp_path, procs, old, new):
    """W ranks consume part of an epoch and save; W' ranks resume from all W states: each
    sample once over old and new ranks (bar padding), equal batch counts on the new ranks."""
    n = 50
    address = free_address()
    procs.serve(job_config(tmp_path, n, batch_size=3), address, workers=2)
    first = run_ranks(address, tmp_path / "first", old, stop_after=2)
    states = tmp_path / "states.json"
    states.write_text(json.dumps([r["state"] for r in first]))
    second = run_ranks(address, tmp_path / "second", new, resume=states)
    assert len({r["batches"] for r in second}) == 1
    assert all(r["batches"] == r["len"] for r in second)
    before = [i for r in first for i in r["indices"]]
    after = [i for r in second for i in r["indices"]]
    assert set(before) | set(after) == set(range(n)) and not set(before) & set(after)
    assert len(after) - len(set(after)) < new  # repeats only as the new ranks' padding


def test_two_ranks_under_torch_distributed(tmp_path, procs):
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    shards = run_two_ranks(address, tmp_path)
    assert shards[0]["batches"] == shards[1]["batches"] == shards[0]["len"]
    assert set(shards[0]["indices"]).isdisjoint(shards[1]["indices"])
    assert sorted(shards[0]["indices"] + shards[1]["indices"]) == list(range(N))


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_skipped_samples_keep_every_rank_at_full_batches_under_torch_distributed(
    tmp_path, procs, source
):
    """error_policy skip with bad files and batch size 1: every rank still yields len(loader)
    full batches (a stand-in in each bad sample's place), so the collectives stay in step;
    the same from shards of that folder (the bad files' bytes become bad members)."""
    root = make_image_folder(tmp_path, per_class=12)  # b/bad.png among 25 files
    for name in ("worse.png", "zzz.png"):
        (root / "a" / name).write_bytes(b"not an image either")
    path = str(root)
    if source == "webdataset":
        assert augserver_main(["shard", f"imagefolder:{root}", str(tmp_path / "s" / "d"),
                               "--shard-size", "16kB"]) == 0
        path = str(tmp_path / "s" / "d.index.json")
    config = _write_config(tmp_path, path, source, batch_size=1, seed=0, error_policy="skip")
    address = free_address()
    procs.serve(config, address, workers=2)
    shards = run_two_ranks(address, tmp_path)
    assert shards[0]["len"] == shards[1]["len"] == 14  # 27 samples over 2 ranks, padded
    for shard in shards:
        assert shard["batches"] == shard["len"] and shard["sizes"] == [1] * shard["len"]
    dataset = open_dataset("imagefolder", str(root))
    bad = {i for i in range(len(dataset))
           if Path(dataset.path(i)).name in ("bad.png", "worse.png", "zzz.png")}
    delivered = shards[0]["indices"] + shards[1]["indices"]
    assert len(bad) == 3 and not bad & set(delivered)


def test_loader_arguments_are_checked():
    with pytest.raises(ValueError, match="rank"):
        RemoteAugMixLoader("tcp://127.0.0.1:1", rank=2, world_size=2)
    with pytest.raises(ValueError, match="prefetch"):
        RemoteAugMixLoader("tcp://127.0.0.1:1", prefetch=0)
    loader = RemoteAugMixLoader("tcp://127.0.0.1:1", rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank 1 of 2"):
        loader.load_state_dict({"epoch": 0, "rank": 1, "world_size": 2, "consumed": []})


def test_no_dispatcher_is_a_clear_timeout(monkeypatch, caplog):
    monkeypatch.setattr("augserver.session.WAIT_REPORT", 0.5)
    address = free_address()
    loader = RemoteAugMixLoader(address, timeout=1.7)
    with caplog.at_level("WARNING", "augserver.client"), \
            pytest.raises(TimeoutError, match=r"no augserver dispatcher answered .* within 1\.7 s "
                          r"\(nothing accepted a connection there") as caught:
        len(loader)
    assert "CURVE" not in str(caught.value)
    waits = [m for r in caplog.records if "waiting for the augserver" in (m := r.getMessage())]
    assert len(waits) >= 2 and all(address in w for w in waits)


@pytest.mark.parametrize(("preprocess", "side", "size", "mean"), [
    ("cifar", 64, 64, (0.5, 0.5, 0.5)),  # Tiny-ImageNet-like: a padded 64 crop
    ("imagenet", 96, 160, (0.485, 0.456, 0.406)),  # progressive resizing at 160
])
def test_other_image_sizes_are_served_and_the_loader_says_so(
    tmp_path: Path, preprocess: str, side: int, size: int, mean: tuple[float, ...]
) -> None:
    data = make_npz(tmp_path, 8, side=side)
    config = job(tmp_path, data, preprocess=preprocess, image_size=size)
    with dispatcher_thread(config) as d, worker_threads(d.address, 1):
        loader = RemoteAugMixLoader(d.address, timeout=60)
        assert (loader.image_size, loader.preprocess, loader.mean) == (size, preprocess, mean)
        assert len(loader.std) == 3
        batches = collect(loader)
    assert sorted(indices(batches)) == list(range(8))
    assert all(v.shape == (len(b), 3, size, size) for b in batches for v in (b.orig, b.aug1))


def test_as_tuples_yields_the_3b_batch_and_targets_without_a_copy(tmp_path: Path) -> None:
    """``for x, y in loader`` as timm loops: x is (clean, aug1, aug2) along the batch, a view
    of the batch's memory; the same bytes as the AugMixBatch views of the same epoch."""
    config = job(tmp_path, make_npz(tmp_path, 16), batch_size=4)
    with dispatcher_thread(config) as d, worker_threads(d.address, 1):
        batches = collect(RemoteAugMixLoader(d.address, ordered=True, timeout=60))
        tuples = list(RemoteAugMixLoader(d.address, ordered=True, timeout=60, as_tuples=True))
    assert len(tuples) == len(batches) == 4
    for (x, y), batch in zip(tuples, batches, strict=True):
        assert x.shape == (12, 3, 32, 32)
        torch.testing.assert_close(x, torch.cat([batch.orig, batch.aug1, batch.aug2]))
        # timm's fast_collate: targets[i + j * B] = label of sample i, for each view j
        timm = torch.zeros(12, dtype=torch.int64)
        for i in range(4):
            for j in range(3):
                timm[i + j * 4] = batch.target[i]
        torch.testing.assert_close(y, timm)
        # timm's JsdCrossEntropy(num_splits=3) takes target[:B] for the clean view's loss
        torch.testing.assert_close(y[: len(y) // 3], batch.target)
        assert batch.concat().data_ptr() == batch.orig.data_ptr()  # a view: no copy
        assert torch.equal(batch.concat()[4:8], batch.aug1)


def test_the_loader_knows_the_classes_without_opening_the_dataset(tmp_path: Path) -> None:
    """The dispatcher names the classes in its welcome: the trainer never reads the data."""
    folder = make_image_folder(tmp_path, per_class=2, corrupt=False)
    with dispatcher_thread(job(tmp_path, folder, "imagefolder")) as d:
        loader = RemoteAugMixLoader(d.address, timeout=10)
        shutil.rmtree(folder)  # nothing on this side reads it
        assert loader.classes == ["a", "b"] and loader.num_classes == 2
    (tmp_path / "npz").mkdir()
    with dispatcher_thread(job(tmp_path / "npz", make_npz(tmp_path / "npz", 20))) as d:
        loader = RemoteAugMixLoader(d.address, timeout=10)
        assert loader.num_classes == 10 and loader.classes == [str(i) for i in range(10)]


def test_an_ipv6_loopback_dispatcher_serves_workers_and_trainers(tmp_path: Path) -> None:
    """``tcp://[::1]:0`` binds, and workers and the loader connect to it (zmq.IPV6 on every
    socket): it used to pass the address check and then fail with "No such device"."""
    config = job(tmp_path, make_npz(tmp_path, 16), bind="tcp://[::1]:0")
    with dispatcher_thread(config) as d, worker_threads(d.address, 1):
        assert d.address.startswith("tcp://[::1]:")
        batches = collect(RemoteAugMixLoader(d.address, ordered=True, timeout=60))
    assert sorted(indices(batches)) == list(range(16))


def test_a_worker_that_cannot_open_the_dataset_tells_the_trainer_why(tmp_path: Path) -> None:
    """The worker exits for good with its reason; the dispatcher keeps that reason, and the
    trainer's error names it instead of "no worker has joined"."""
    from augserver.worker import EXIT_FATAL, run_worker

    data = make_npz(tmp_path, 16)
    config = job(tmp_path, data, limits={"no_worker_seconds": 3.0})
    with dispatcher_thread(config) as d:
        data.unlink()  # the dispatcher has read it; the worker will not find it
        assert run_worker(d.address, name="w-nodata") == EXIT_FATAL
        with pytest.raises(RemoteError, match="w-nodata: cannot use the job"):
            collect(RemoteAugMixLoader(d.address, timeout=30))
