"""The example trainer (:mod:`client.programs.train`), its models and its local dispatcher, end
to end on tiny data: every method through a local server, exact resumption from a checkpoint, a
job that does not match the method, and a two-process torchrun (gloo, CPU) run."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.checkpoint import load_checkpoint
from client.programs.local_server import local_server
from client.programs.models import MODELS, build_model
from client.programs.train import (
    METHODS,
    _small_image_preprocess,
    cosine_lr_factor,
    job_config,
    main,
)
from client.programs.train import make_scheduler as make_cosine
from tests.service_helpers import REPO, make_npz, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]

TINY = ["--model", "small_cnn", "--no-progress", "--log-every", "1", "--epochs", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 random 32x32 images: 3 batches of 16 per epoch."""
    return make_npz(tmp_path_factory.mktemp("train-data"), n=48)


@pytest.fixture(scope="module")
def jsd_server(data: Path) -> Iterator[str]:
    """One dispatcher (JSD job, batch 16, CIFAR preprocessing) shared by the --connect tests."""
    job = job_config("npz", data, method="augmix+jsd", batch_size=16, seed=3, preprocess="cifar")
    with local_server(job, workers=1) as address:
        yield address


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize(("name", "params"), [("wrn40_2", 2_243_546), ("resnet18", 11_173_962)])
def test_reference_models_have_the_published_sizes(name: str, params: int) -> None:
    model = build_model(name, 10)
    assert sum(p.numel() for p in model.parameters()) == params  # ~2.2M and ~11.2M
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_large_inputs_get_the_imagenet_stem(name: str) -> None:
    """At 224 px the first layer strides (ResNet-18: 7x7/2 and a max-pool, ImageNet's), so
    the activations after the stem are 16x smaller than with the CIFAR stem."""
    small, large = build_model(name, 10, 32), build_model(name, 10, 224)
    first = next(m for m in large.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.kernel_size == (7, 7) and first.stride[0] >= 2
    assert next(m for m in small.modules() if isinstance(m, torch.nn.Conv2d)).stride == (1, 1)
    large.eval()
    with torch.no_grad():
        assert large(torch.zeros(1, 3, 224, 224)).shape == (1, 10)


def test_small_cnn_and_bad_names() -> None:
    assert build_model("small_cnn", 7)(torch.zeros(3, 3, 32, 32)).shape == (3, 7)
    with pytest.raises(ValueError, match="wrn40_2, resnet18, small_cnn"):
        build_model("resnet50", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", 0)
    assert MODELS == ("wrn40_2", "resnet18", "small_cnn")


def test_wrn_init_follows_the_reference() -> None:
    torch.manual_seed(0)
    model = build_model("wrn40_2", 10)
    conv = model.block2[0].conv1  # 3x3, 64 outputs: std sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    assert torch.all(model.fc.bias == 0) and torch.all(model.bn1.weight == 1)


# ---------------------------------------------------------------------------- schedule


def test_cosine_schedule_per_step() -> None:
    lr, total = 0.1, 40
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_cosine(optimizer, total, lr)
    seen = []
    for _ in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    floor = 1e-6 / lr
    expected = [lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / total)))
                for s in range(total + 1)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == pytest.approx(lr) and seen[total // 2] == pytest.approx(lr / 2, rel=1e-4)
    assert seen[-1] == pytest.approx(1e-6)
    assert cosine_lr_factor(0, 10, 0.0) == 1.0 and cosine_lr_factor(10, 10, 0.0) == 0.0


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_through_a_local_server(
    method: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = {"augmix+jsd": [], "augmix": ["--no-jsd"], "standard": ["--standard"]}[method]
    ckpt = tmp_path / "ck.pt"
    status = main(["--dataset", f"npz:{data}", "--workers", "1", "--batch-size", "16",
                   "--preprocess", "cifar", "--max-steps", "3", "--checkpoint", str(ckpt),
                   *TINY, *flag])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"{method} on npz:" in out and "3 batches/epoch of 16" in out
    assert "done: 3 steps" in out and "samples/s" in out and "data-wait" in out
    state = load_checkpoint(ckpt)
    assert state["method"] == method and state["step"] == 3
    assert state["model_name"] == "small_cnn" and state["num_classes"] == 10
    assert state["mean"] == (0.5, 0.5, 0.5) and state["std"] == (0.5, 0.5, 0.5)
    assert state["loader"] == state["loaders"][0] and state["loader"]["epoch"] == 0
    model = build_model("small_cnn", 10)
    model.load_state_dict(state["model"])  # the evaluation CLI's way back
    assert not list(tmp_path.glob(".*tmp*")), "a temporary checkpoint was left behind"


def test_resume_gives_exactly_the_uninterrupted_run(jsd_server: str, tmp_path: Path) -> None:
    common = ["--connect", jsd_server, "--ordered", "--seed", "5", "--checkpoint-every", "0",
              *TINY]  # fmt: skip
    whole, split = tmp_path / "whole.pt", tmp_path / "split.pt"
    assert main([*common, "--max-steps", "4", "--checkpoint", str(whole),
                 "--index-log", str(tmp_path / "whole")]) == 0  # fmt: skip
    assert main([*common, "--max-steps", "2", "--checkpoint", str(split),
                 "--index-log", str(tmp_path / "split")]) == 0  # fmt: skip
    middle = load_checkpoint(split)
    # stopped inside epoch 0 (3 batches): the loader's state says which batches are consumed
    assert middle["epoch"] == 0 and middle["loader"]["consumed"] == [[0, 2]]
    assert main([*common, "--max-steps", "4", "--checkpoint", str(split), "--resume",
                 "--index-log", str(tmp_path / "split")]) == 0  # fmt: skip

    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert a["step"] == b["step"] == 4 and a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert a["loader"] == b["loader"]
    # the same batches in the same order: no replay and no gap across the restart
    whole_log = (tmp_path / "whole" / "rank0.txt").read_text().splitlines()
    assert (tmp_path / "split" / "rank0.txt").read_text().splitlines() == whole_log
    assert len(whole_log) == 4 and len({i for line in whole_log[:3]
                                        for i in line.split()[1:]}) == 48


def test_no_jsd_against_a_jsd_job_is_a_clear_error(
    jsd_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--connect", jsd_server, "--no-jsd", "--max-steps", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--no-jsd" in err and "jsd: false" in err and "jsd: true" in err
    assert jsd_server in err
    with pytest.raises(SystemExit):
        main(["--connect", jsd_server, "--batch-size", "8"])  # the job owns the batch size


TEARDOWN_ABORT = "terminate called without an active exception"


def test_torchrun_two_ranks_on_gloo(jsd_server: str, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    # faulthandler: a rank that aborts prints its Python stacks
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "client.programs.train",
         "--connect", jsd_server, "--epochs", "1", "--model", "small_cnn", "--no-progress",
         "--checkpoint", str(tmp_path / "ck.pt"), "--index-log", str(tmp_path / "idx")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,  # generous: 2 x torch
    )  # fmt: skip
    assert "x 2 rank(s)" in proc.stdout and proc.stdout.count("done:") == 1, proc.stderr
    seen = []
    for rank in (0, 1):
        lines = (tmp_path / "idx" / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 2  # 24 samples per rank: batches of 16 and 8
        seen.append({int(i) for line in lines for i in line.split()[1:]})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(48))
    state = load_checkpoint(tmp_path / "ck.pt")
    assert [s["rank"] for s in state["loaders"]] == [0, 1] and state["step"] == 2
    assert not any(k.startswith("module.") for k in state["model"])  # unwrapped from DDP
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr:
        # Seen twice in ~10 full CI runs, never in 60+ runs of this test alone: a rank aborts
        # in C++ teardown after the run completed (everything above was checked). Reported,
        # not hidden: the XFAIL and the stacks show in the log.
        pytest.xfail(f"a rank aborted after completing: {TEARDOWN_ABORT}\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_two_rank_checkpoint_resumes_in_one_process(jsd_server: str, tmp_path: Path) -> None:
    """Elastic resume through the trainer: 2 torchrun ranks take one batch each and save;
    one process resumes from their checkpoint and finishes the epoch, each sample once."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ckpt = tmp_path / "ck.pt"
    common = ["--connect", jsd_server, "--model", "small_cnn", "--no-progress", "--checkpoint",
              str(ckpt), "--index-log", str(tmp_path / "idx")]
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "client.programs.train",
         *common, "--max-steps", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 or TEARDOWN_ABORT in proc.stderr, proc.stdout + proc.stderr
    assert len(load_checkpoint(ckpt)["loaders"]) == 2
    assert main([*common, "--resume", "--epochs", "1"]) == 0
    seen = [int(i) for rank in (0, 1) for line in
            (tmp_path / "idx" / f"rank{rank}.txt").read_text().splitlines()
            for i in line.split()[1:]]
    assert sorted(seen) == list(range(48))  # 16 + 16 by the two ranks, the last 16 here


def test_torchrun_needs_connect(data: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["--dataset", f"npz:{data}"])
    assert "--connect" in capsys.readouterr().err


def test_eval_hook_writes_results(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from client.programs import train as trainer  # its evaluate(), patched below
    calls = {}

    def small_evaluate(*args, **kwargs):  # 1 corruption x 1 severity keeps this fast
        calls.update(kwargs)
        return real(*args, names=("gaussian_noise",), severities=(1,), **kwargs)

    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", small_evaluate)
    rng = np.random.default_rng(0)
    test_npz = tmp_path / "test.npz"
    np.savez(test_npz, x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y=np.arange(20) % 10)
    results = tmp_path / "results.json"
    status = main(["--dataset", f"npz:{data}", "--workers", "1", "--batch-size", "16",
                   "--preprocess", "cifar", "--standard", "--max-steps", "1",
                   "--eval-npz", str(test_npz), "--eval-cache", str(tmp_path / "cache"),
                   "--results", str(results), *TINY])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert "standard" in out and "mCE %" in out and "gaussian_noise" in out
    assert calls["mean"] == (0.5, 0.5, 0.5) and calls["cache_dir"] == str(tmp_path / "cache")
    assert '"standard"' in results.read_text()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
@pytest.mark.skipif(sys.platform != "linux", reason="PDEATHSIG is Linux's")
def test_a_stopped_trainer_takes_its_local_dispatcher_with_it(
    data: Path, how: signal.Signals
) -> None:
    trainer = subprocess.Popen(
        [sys.executable, "-m", "client.programs.train", "--dataset", f"npz:{data}",
         "--workers", "1", "--preprocess", "cifar", "--batch-size", "16", *TINY[:-1], "1000"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    serving: list[int] = []
    try:
        assert trainer.stdout is not None
        first = trainer.stdout.readline()  # printed once the dispatcher answered
        port = int(re.search(r"tcp://127\.0\.0\.1:(\d+)", first)[1])
        serving = [p for p in _children(trainer.pid) if "serve" in _cmdline(p)]
        assert serving, "the trainer started no dispatcher"
        trainer.send_signal(how)
        assert trainer.wait(30) == (143 if how == signal.SIGTERM else -signal.SIGKILL)
        wait_for(lambda: not any(_alive(p) for p in serving), 20, "the dispatcher to stop")
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "something still listens"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid in serving:  # when the test failed: no orphans either way
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize(("how", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_trainer_saves_its_checkpoint_and_says_so_in_one_line(
    data: Path, tmp_path: Path, how: signal.Signals, code: int
) -> None:
    ckpt = tmp_path / "ck.pt"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "client.programs.train", "--dataset", f"npz:{data}",
         "--workers", "1", "--preprocess", "cifar", "--batch-size", "16", *TINY[:-1], "1000",
         "--no-progress", "--log-every", "1", "--checkpoint", str(ckpt),
         "--checkpoint-every", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )  # fmt: skip
    try:
        assert trainer.stdout is not None
        while "step 2/" not in trainer.stdout.readline():
            assert trainer.poll() is None, "the trainer ended early"
        trainer.send_signal(how)
        try:
            _, err = trainer.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            trainer.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            _, err = trainer.communicate(timeout=30)
            pytest.fail(f"the interrupted trainer did not end:\n{err[-6000:]}")
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == code, err
    assert "Traceback" not in err
    line = [e for e in err.splitlines() if "interrupted at step" in e]
    assert len(line) == 1 and str(ckpt) in line[0] and "--resume" in line[0]
    assert load_checkpoint(ckpt)["step"] >= 2


def test_progress_lines_come_by_time_as_well_as_by_steps(
    data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--log-every 1000 would print nothing in 6 steps; --log-seconds 0 prints every step,
    and --tensorboard writes the figures."""
    status = main(["--dataset", f"npz:{data}", "--workers", "1", "--batch-size", "16",
                   "--preprocess", "cifar", "--max-steps", "6", *TINY, "--log-every", "1000",
                   "--log-seconds", "0", "--tensorboard", str(tmp_path / "tb")])  # fmt: skip
    assert status == 0
    assert capsys.readouterr().out.count("  step ") == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/data_wait"} <= set(tags)
    assert len(events.Scalars("train/loss")) == 6


def test_num_classes_fewer_than_the_datasets_is_a_clear_error(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--dataset", f"npz:{data}", "--workers", "1", "--batch-size", "16",
                   "--preprocess", "cifar", "--max-steps", "1", "--num-classes", "3", *TINY])
    assert status == 2
    assert "--num-classes 3 is fewer than the 10 classes" in capsys.readouterr().err


def test_eval_every_reports_the_clean_error_each_epoch(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--dataset", f"npz:{data}", "--workers", "1", "--batch-size", "16",
                   "--preprocess", "cifar", "--epochs", "2", "--model", "small_cnn",
                   "--no-progress", "--eval-test", str(data), "--eval-every", "1",
                   "--eval-limit", "20", "--log-every", "100"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert re.search(r"epoch 1: clean test error \d+\.\d\d% \(20 samples\)", out), out
    assert "epoch 2: clean test error" in out


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has stopped (its parent reaps it later)


def test_small_npz_images_get_cifar_preprocessing(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small = make_npz(tmp_path / "small", n=4, side=32)
    large = make_npz(tmp_path / "large", n=2, side=96)
    assert _small_image_preprocess("npz", str(small)) == "cifar"
    assert "32x32 images: preprocess cifar" in capsys.readouterr().out
    assert _small_image_preprocess("npz", str(large)) is None  # the job's default: imagenet
    assert _small_image_preprocess("imagefolder", str(small)) is None
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert _small_image_preprocess("npz", str(tmp_path / "broken.npz")) is None


def test_the_wait_for_the_first_batch_is_kept_apart_from_the_steady_state() -> None:
    from client.programs.train import TrainResult, _Meter

    meter = _Meter(world_size=1)
    meter.add(2.0, 2.1, 8, torch.tensor(1.0))  # 2 s of start-up before the first batch
    meter.add(0.05, 0.1, 8, torch.tensor(1.0))
    assert meter.first_batch == 2.0
    assert (meter.wait, round(meter.time, 6)) == (0.05, 0.2)
    assert meter.stats()["data-wait"] == "25%" and meter.stats()["samples/s"] == "80.0"
    result = TrainResult(samples=16, seconds=2.2, first_batch_seconds=2.0)
    assert round(result.samples_per_second) == 80


def test_the_local_dispatcher_serves_the_image_size_asked_for(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--image-size with --dataset: the job's views at that side, and the checkpoint says
    so (cifar's padded crop at any side)."""
    ckpt = tmp_path / "ck.pt"
    status = main(["--dataset", f"npz:{data}", "--workers", "1", "--batch-size", "16",
                   "--preprocess", "cifar", "--image-size", "24", "--max-steps", "1",
                   "--checkpoint", str(ckpt), *TINY])  # fmt: skip
    assert status == 0, capsys.readouterr().out
    assert load_checkpoint(ckpt)["image_size"] == 24
