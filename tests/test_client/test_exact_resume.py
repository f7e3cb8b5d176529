"""Resume is exact after any stop: a signal inside the forward pass, the backward pass or the
optimizer's update, at a random moment, or a stream that fails; one process and torchrun, with
the same and with another number of ranks. The union of the index logs before and after the
stop is the uninterrupted epoch, sample by sample."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from client.checkpoint import load_checkpoint
from client.loader import RemoteAugMixLoader
from client.programs.local_server import local_server
from client.programs.models import build_model
from client.programs.train import Interrupted, StreamFailed, job_config, train
from tests.service_helpers import REPO, make_npz

pytestmark = [pytest.mark.service, pytest.mark.slow]

N, BATCH, EPOCHS = 64, 8, 2  # 8 steps an epoch, 16 in all


def _dispatcher(tmp_path_factory: pytest.TempPathFactory, n: int) -> Iterator[str]:
    """A local dispatcher with 2 workers on ``n`` random images, JSD batches of BATCH."""
    data = make_npz(tmp_path_factory.mktemp("exact-data"), n=n)
    job = job_config("npz", data, method="augmix+jsd", batch_size=BATCH, seed=1,
                     preprocess="cifar")
    with local_server(job, workers=2) as address:
        yield address


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _dispatcher(tmp_path_factory, N)


class Tripwire(nn.Module):
    """small_cnn that sends this process SIGINT in the middle of step ``at``: in the forward
    pass, or (``phase`` backward) while the gradients are being computed."""

    def __init__(self, at: int, phase: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = build_model("small_cnn", 10, 32)
        self.at, self.phase, self.calls = at, phase, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.02)  # steps of some length: a run of 16 lasts past every random signal
        fire = self.calls == self.at
        if fire and self.phase == "forward":
            _sigint()
        y = self.inner(x)
        if fire and self.phase == "backward" and y.requires_grad:
            y.register_hook(lambda grad: _sigint())
        return y


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.02)  # the handler runs here, in the middle of the step


def _run(address: str, model: nn.Module, folder: Path, resume: bool = False) -> None:
    loader = RemoteAugMixLoader(address, ordered=True, prefetch=2)
    try:
        train(loader, model, epochs=EPOCHS, checkpoint=folder / "ck.pt", resume=resume,
              index_log=folder / "idx", progress=False)
    finally:
        loader.close()


def _log(folder: Path, ranks: int = 1) -> list[str]:
    return [line for rank in range(ranks)
            for line in (folder / "idx" / f"rank{rank}.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict]:
    """The uninterrupted run: its index log and final weights."""
    folder = tmp_path_factory.mktemp("whole")
    model = Tripwire(at=-1, phase="none")
    _run(server, model, folder)
    return _log(folder), {k: v.clone() for k, v in model.inner.state_dict().items()}


def _check_exact(folder: Path, model: Tripwire, whole: tuple[list[str], dict]) -> None:
    log, weights = whole
    assert _log(folder) == log  # the same batches in the same order: no replay, no gap
    for key, value in model.inner.state_dict().items():
        assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer"])
def test_a_signal_inside_a_step_saves_that_step_whole(
        server: str, whole: tuple[list[str], dict], tmp_path: Path, phase: str) -> None:
    """The step the signal lands in completes, the run stops before the next one, and the
    checkpoint counts exactly the batches trained on."""
    at = 5
    model = Tripwire(at, phase)
    hook: Callable[[], None] | None = None
    if phase == "optimizer":
        calls = [0]

        def in_update(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
            calls[0] += 1
            if calls[0] == at:
                _sigint()

        hook = register_optimizer_step_pre_hook(in_update).remove
    try:
        with pytest.raises(Interrupted, match=f"interrupted at step {at} ") as stopped:
            _run(server, model, tmp_path)
    finally:
        if hook is not None:
            hook()
    assert stopped.value.code == 130
    state = load_checkpoint(tmp_path / "ck.pt")
    assert state["step"] == at and len(_log(tmp_path)) == at
    assert sum(b - a for a, b in state["loader"]["consumed"]) == at
    resumed = Tripwire(at=-1, phase="none")
    _run(server, resumed, tmp_path, resume=True)
    _check_exact(tmp_path, resumed, whole)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_signal_at_a_random_moment_resumes_exactly(
        server: str, whole: tuple[list[str], dict], tmp_path: Path, seed: int) -> None:
    """SIGINT from another thread at a random moment of the run (in a step, in the wait for a
    batch, between the two), then a resume: the run is the uninterrupted one, bit for bit."""
    delay = random.Random(seed).uniform(0.01, 0.25)
    timer = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT))
    model = Tripwire(at=-1, phase="none")
    timer.start()
    try:
        _run(server, model, tmp_path)
        pytest.skip(f"the run ended before the signal at {delay:.2f} s")
    except Interrupted:
        pass
    finally:
        timer.cancel()
    resumed = Tripwire(at=-1, phase="none")
    _run(server, resumed, tmp_path, resume=True)
    _check_exact(tmp_path, resumed, whole)


class FailingLoader(RemoteAugMixLoader):
    """Its stream fails (as the dispatcher's error would) after ``good`` batches."""

    def __init__(self, address: str, good: int) -> None:
        super().__init__(address, ordered=True, prefetch=2)
        self.good = good

    def __iter__(self) -> Iterator:
        batches = super().__iter__()
        try:
            for _ in range(self.good):  # then fails where the stream's error is raised:
                yield next(batches)     # before the next batch is taken
            raise RuntimeError("dispatcher tcp://...: stream failed: the store is gone")
        finally:
            batches.close()


def test_a_failed_stream_saves_the_last_completed_step(
        server: str, whole: tuple[list[str], dict], tmp_path: Path) -> None:
    model = Tripwire(at=-1, phase="none")
    loader = FailingLoader(server, good=3)
    with pytest.raises(StreamFailed, match="the store is gone") as failed:
        train(loader, model, epochs=EPOCHS, checkpoint=tmp_path / "ck.pt",
              index_log=tmp_path / "idx", progress=False)
    loader.close()
    assert "--resume" in str(failed.value) and "step 3" in str(failed.value)
    assert load_checkpoint(tmp_path / "ck.pt")["step"] == 3
    resumed = Tripwire(at=-1, phase="none")
    _run(server, resumed, tmp_path, resume=True)
    _check_exact(tmp_path, resumed, whole)


# ---------------------------------------------------------------------------- torchrun

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONFAULTHANDLER": "1"}


def _trainer(ranks: int, address: str, folder: Path, *extra: str) -> list[str]:
    program = ["-m", "client.programs.train", "--connect", address, "--model", "small_cnn",
               "--no-progress", "--log-every", "1", "--epochs", str(EPOCHS), "--checkpoint",
               str(folder / "ck.pt"), "--index-log", str(folder / "idx"), *extra]
    if ranks == 1:
        return [sys.executable, *program]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc-per-node", str(ranks), *program]


def _epochs(folder: Path) -> dict[int, Counter]:
    seen: dict[int, Counter] = {}
    for path in (folder / "idx").glob("rank*.txt"):
        for line in path.read_text().splitlines():
            epoch, *indices = line.split()
            seen.setdefault(int(epoch), Counter()).update(int(i) for i in indices)
    return seen


BIG = 256  # 32 steps an epoch in one process: a stop after step 2 comes well inside the run


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _dispatcher(tmp_path_factory, BIG)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_stopped_run_resumes_exactly_on_another_number_of_ranks(
        big_server: str, tmp_path: Path, before: int, after: int) -> None:
    """SIGTERM (torchrun forwards it to its ranks) at a random moment after step 2, then a
    resume with another world size: every sample of every epoch once, none twice."""
    server = big_server
    trainer = subprocess.Popen(_trainer(before, server, tmp_path), cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None
        while "step 2/" not in (line := trainer.stdout.readline()):
            assert line or trainer.poll() is None, trainer.stderr.read()[-4000:]
        time.sleep(random.uniform(0, 0.05))
        trainer.send_signal(signal.SIGTERM)
        _, err = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert (tmp_path / "ck.pt").exists(), err[-4000:]
    assert err.count("interrupted at step") == 1, err[-4000:]  # rank 0 alone says it
    stopped = load_checkpoint(tmp_path / "ck.pt")["step"]
    assert 2 <= stopped < EPOCHS * BIG // BATCH // before
    done = subprocess.run([*_trainer(after, server, tmp_path), "--resume"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 or "terminate called" in done.stderr, done.stderr[-4000:]
    seen = _epochs(tmp_path)
    assert sorted(seen) == list(range(EPOCHS))
    for epoch, counts in seen.items():
        assert counts == Counter(range(BIG)), (epoch, counts - Counter(range(BIG)),
                                               Counter(range(BIG)) - counts)
