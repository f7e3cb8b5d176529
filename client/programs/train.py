"""The example trainer: the AugMix paper's CIFAR recipe fed by an augserver dispatcher.

    python -m client.programs.train --dataset cifar10:/data/cifar-10-batches-py --workers 8
    python -m client.programs.train --connect tcp://HOST:5555              # a running dispatcher
    torchrun --nproc-per-node 4 -m client.programs.train --connect tcp://HOST:5555       # DDP

Defaults are the paper's CIFAR recipe (docs/augmix.md): WRN-40-2, 100 epochs, batch 128, SGD with
nesterov momentum 0.9, lr 0.1 with the reference's per-step cosine decay (LambdaLR of
``0.5 * (1 + cos(pi * step / total_steps))`` with a floor of ``1e-6 / lr``), weight decay
5e-4, the JSD loss with lambda 12. The method is one setting:

- ``augmix+jsd`` (default): the (orig, aug1, aug2) triple in one forward pass,
  ``jsd_loss`` (cross-entropy on the clean view + 12 * JS);
- ``augmix`` (``--no-jsd``): one AugMix view per sample, cross-entropy;
- ``standard`` (``--standard``): no AugMix (job ``augment: none``), cross-entropy on the plain
  preprocessed image.

With ``--dataset FORMAT:PATH`` the trainer starts its own dispatcher with ``--workers`` local
workers (``client.programs.local_server``) and writes the job: the method's ``augment``/``jsd``,
``--batch-size``, ``--seed``, ``--preprocess`` (default: cifar for CIFAR and for an npz of
images <= 64 px), ``--severity``. With ``--connect`` the job
is the dispatcher's (batch size included) and must match the method, else it is an error
naming both.

Checkpoints (``--checkpoint PATH``, every ``--checkpoint-every`` steps and at the end, written
to a temporary file and renamed) are one ``torch.save`` dict: ``model`` (state_dict, unwrapped
from DDP), ``model_name``, ``num_classes``, ``mean``, ``std`` (the job's normalisation),
``preprocess`` (the job's, for the test-time view), ``optimizer``, ``scheduler``, ``scaler``
(fp16 only, else None), ``loader`` (this rank's ``RemoteAugMixLoader.state_dict()``),
``loaders`` (every rank's, in rank order), ``epoch``,
``step``, ``method``, ``args`` and ``rng`` (torch's CPU and CUDA generator states). Only plain
types and tensors: it loads with ``torch.load(path, weights_only=True)``. ``--resume`` continues
exactly where it was taken: same weights, optimizer and schedule, and the loader resumes
mid-epoch with no replay and no gap (with ``--ordered`` the whole run is bit-for-bit the
uninterrupted one).

On CUDA the model runs under ``torch.autocast`` (bfloat16 where supported, else float16 with a
GradScaler) in channels_last layout, and the loader delivers channels_last batches; on CPU
everything is plain float32.

torchrun / DDP: with ``WORLD_SIZE`` > 1 each process joins the process group (nccl on CUDA,
gloo on CPU) and wraps the model in DistributedDataParallel; the loader takes its rank from
torch.distributed and every rank gets the same number of batches per epoch, so DDP never
hangs. Under torchrun ``--connect`` is required: one dispatcher serves all ranks (start it with
``augserver serve`` next to the trainers); a dispatcher started by rank 0 on its loopback
would be unreachable from other nodes and would die with rank 0. Rank 0 alone prints
progress, saves checkpoints and evaluates; every rank's loader state goes into the checkpoint.

``--eval-test SOURCE`` (an ``.npz`` of ``x``: N x H x W x 3 uint8 at the training resolution
and ``y``: labels, or ``FORMAT:PATH`` of a dataset's test split, seen through the job's
test-time preprocessing; ``--eval-limit N`` takes a seeded subset) evaluates the final model on
rank 0 with :mod:`client.robustness.evaluation` (clean and corrupted test sets, corrupted sets
cached in ``--eval-cache``), prints the table and writes ``--results`` JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
import traceback
import zipfile
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from augserver import preprocessing
from augserver.addresses import connect_address
from augserver.cli import positive_int
from augserver.config import ConfigError, JobConfig
from augserver.datasets import FORMATS
from augserver.errors import AugserverError
from client.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from client.distributed import world
from client.loader import AugMixBatch, LoaderInterrupted, RemoteAugMixLoader
from client.loss import jsd_loss, split_views
from client.programs.local_server import local_server
from client.programs.models import MODELS, build_model
from client.programs.stopping import (
    END,
    FAILED,
    STEP,
    STOP,
    RankAgreement,
    StopRequest,
    Terminated,
)
from client.robustness.evaluation import (
    evaluate,
    format_table,
    load_test_set,
    predict,
    write_json,
)

__all__ = [
    "METHODS",
    "Interrupted",
    "StreamFailed",
    "TrainError",
    "TrainResult",
    "cosine_lr_factor",
    "job_config",
    "job_method",
    "main",
    "make_scheduler",
    "train",
]

METHODS = ("augmix+jsd", "augmix", "standard")
"""Training methods: the JSD triple, one AugMix view with cross-entropy, no AugMix."""

_METHOD_FLAG = {"augmix+jsd": "the default (JSD)", "augmix": "--no-jsd", "standard": "--standard"}
_METHOD_JOB = {
    "augmix+jsd": "augment: augmix, jsd: true",
    "augmix": "augment: augmix, jsd: false",
    "standard": "augment: none",
}
_WINDOW = 50  # steps in the running loss / samples/s / data-wait window


class TrainError(AugserverError, RuntimeError):
    """A training run that cannot start as asked (a job/method mismatch, a bad checkpoint)."""


# ---------------------------------------------------------------------------- job and method


def job_method(job: JobConfig) -> str:
    """The method a dispatcher's job feeds: ``standard``, ``augmix`` or ``augmix+jsd``."""
    if job.augment == "none":
        return "standard"
    return "augmix+jsd" if job.jsd else "augmix"


def job_config(
    fmt: str,
    path: str | os.PathLike[str],
    *,
    method: str,
    batch_size: int = 128,
    seed: int = 0,
    preprocess: str | None = None,
    severity: int | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """The job file (as a dict, for :func:`client.programs.local_server.local_server`) that serves
    ``method`` on the dataset ``fmt`` at ``path``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    job: dict[str, Any] = {
        "dataset": {"format": fmt, "path": os.path.abspath(os.fspath(path))},
        "augment": "none" if method == "standard" else "augmix",
        "jsd": method == "augmix+jsd",
        "batch_size": batch_size,
        "seed": seed,
    }
    if preprocess is not None:
        job["preprocess"] = preprocess
    if severity is not None:
        job["augmix"] = {"severity": severity}
    if image_size is not None:
        job["image_size"] = image_size
    return job


def check_method(job: JobConfig, method: str, address: str) -> None:
    """Raise :class:`TrainError` naming both sides when the job does not feed ``method``."""
    served = job_method(job)
    if served != method:
        raise TrainError(
            f"method {method!r} ({_METHOD_FLAG[method]}) needs a job with {_METHOD_JOB[method]}, "
            f"but the dispatcher at {address} serves augment: {job.augment}, "
            f"jsd: {str(job.jsd).lower()} (method {served!r}, {_METHOD_FLAG[served]})"
        )


# ---------------------------------------------------------------------------- schedule


def cosine_lr_factor(step: int, total_steps: int, min_ratio: float) -> float:
    """The AugMix reference's ``get_lr(step, total_steps, 1, min_ratio)``: the lr multiplier
    decaying from 1 at step 0 to ``min_ratio`` at ``total_steps`` on a half cosine."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay as in the reference (stepped after every optimizer step), with
    the floor ``1e-6 / lr`` (an lr of 1e-6 at the end)."""
    total = max(1, total_steps)
    min_ratio = 1e-6 / lr

    def factor(step: int) -> float:
        return cosine_lr_factor(step, total, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------- progress


@dataclass
class TrainResult:
    """What a :func:`train` call did (this rank's view; samples are counted over all ranks)."""

    steps: int = 0
    """Optimizer steps taken by this call (after a resume: the new ones only)."""
    last_step: int = 0
    """The global step count at the end (checkpointed steps included)."""
    epoch: int = 0
    """The epoch the loader was in at the end."""
    samples: int = 0
    seconds: float = 0.0
    """Wall time of the whole call."""
    first_batch_seconds: float = 0.0
    """Time until the first batch arrived: start-up and warm-up (dispatcher, workers, kernels),
    kept apart from the steady-state figures."""
    data_wait: float = 0.0
    """Share of the step time spent blocked in ``next(loader)``, from the first batch on."""
    losses: list[float] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        """Samples per second from the first batch on."""
        steady = self.seconds - self.first_batch_seconds
        return self.samples / steady if steady > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss of the last (up to) 10 steps; NaN without steps."""
        tail = self.losses[-10:]
        return float(np.mean(tail)) if tail else float("nan")


class _Meter:
    """Step timing and loss over a recent window, and totals for the summary. The wait for the
    run's first batch (start-up and warm-up) is kept apart in :attr:`first_batch`, so that
    samples/s and data-wait describe the steady state."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.window: deque[tuple[float, float, int]] = deque(maxlen=_WINDOW)
        self.losses: list[torch.Tensor] = []
        self.wait = self.time = 0.0
        self.samples = 0
        self.first_batch: float | None = None

    def add(self, wait: float, total: float, n: int, loss: torch.Tensor) -> None:
        if self.first_batch is None:
            self.first_batch = wait
            wait, total = 0.0, total - wait
        self.window.append((wait, total, n * self.world_size))
        self.losses.append(loss.detach())
        self.wait += wait
        self.time += total
        self.samples += n * self.world_size

    def numbers(self) -> dict[str, float]:
        """Recent loss, samples/s and data-wait (NaN where nothing is measured yet)."""
        wait, total, samples = (sum(v) for v in zip(*self.window, strict=True))
        loss = torch.stack(self.losses[-_WINDOW:]).mean().item()
        nan = float("nan")
        return {"loss": loss, "samples_per_s": samples / total if total > 0 else nan,
                "data_wait": wait / total if total > 0 else nan}

    def stats(self) -> dict[str, str]:
        n = self.numbers()
        measured = not math.isnan(n["samples_per_s"])
        return {
            "loss": f"{n['loss']:.4f}",
            "samples/s": f"{n['samples_per_s']:.1f}" if measured else "-",
            "data-wait": f"{n['data_wait']:.0%}" if measured else "-",
        }

    def loss_values(self) -> list[float]:
        return torch.stack(self.losses).float().tolist() if self.losses else []


class _Progress:
    """A tqdm bar per epoch on a terminal, else one line every ``log_every`` steps and at
    least every ``log_seconds`` seconds (piped output never stays silent for long); with a
    TensorBoard ``writer``, the same figures as scalars at each of those points."""

    def __init__(self, enabled: bool, bar: bool, log_every: int, stop_at: int,
                 log_seconds: float = 10.0, writer: Any = None) -> None:
        self.enabled = enabled
        self.bar_wanted = enabled and bar
        self.log_every = max(1, log_every)
        self.log_seconds = log_seconds
        self.stop_at = stop_at
        self.bar: Any = None
        self.writer = writer
        self.last_line = time.monotonic()

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if self.bar_wanted:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", dynamic_ncols=True)
        self.epoch_label = f"epoch {epoch + 1}/{epochs}"

    def step(self, step: int, meter: _Meter, lr: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        due = (step % self.log_every == 0 or step == self.stop_at
               or now - self.last_line >= self.log_seconds)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == self.stop_at:
                self.bar.set_postfix(meter.stats(), refresh=False)
        elif due:
            stats = meter.stats()
            print(f"{self.epoch_label}  step {step}/{self.stop_at}  loss {stats['loss']}  "
                  f"{stats['samples/s']} samples/s  data-wait {stats['data-wait']}", flush=True)
        if due:
            self.last_line = now
            if self.writer is not None:
                for name, value in meter.numbers().items():
                    self.writer.add_scalar(f"train/{name}", value, step)
                self.writer.add_scalar("train/lr", lr, step)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------- training


def _forward_loss(
    model: nn.Module, batch: AugMixBatch, method: str, jsd_lambda: float, autocast: Any
) -> torch.Tensor:
    with autocast:
        if method == "augmix+jsd":
            logits = model(batch.concat())
        else:
            view = batch.aug1 if method == "augmix" else batch.orig
            if view is None:
                raise TrainError(f"method {method!r} got a batch without its view")
            logits = model(view)
    logits = logits.float()  # the loss in float32, also under autocast
    if method == "augmix+jsd":
        return jsd_loss(*split_views(logits), batch.target, lam=jsd_lambda)
    return F.cross_entropy(logits, batch.target)


@dataclass(eq=False)
class _Run:
    """One training run: what :func:`_setup` builds, :func:`_resume` restores, :func:`_step`
    advances and :func:`_save` writes."""

    loader: RemoteAugMixLoader
    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Any
    method: str
    jsd_lambda: float
    rank: int
    world_size: int
    path: Path | None
    meta: dict[str, Any]
    step: int = 0
    start_epoch: int = 0


def _setup(
    loader: RemoteAugMixLoader, model: nn.Module, *, method: str, epochs: int, lr: float,
    momentum: float, weight_decay: float, jsd_lambda: float, device: torch.device,
    checkpoint: str | os.PathLike[str] | None, checkpoint_meta: Mapping[str, Any] | None,
) -> _Run:
    """The model on ``device``, SGD with the cosine schedule over ``epochs``, mixed precision
    on CUDA (bfloat16 where the GPU has it, else float16 with loss scaling)."""
    cuda = device.type == "cuda"
    rank, world_size = world()
    model.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=True)
    scheduler = make_scheduler(optimizer, epochs * len(loader), lr)
    autocast: Any = contextlib.nullcontext()  # CPU: plain float32
    amp_dtype = None
    if cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = torch.autocast("cuda", dtype=amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return _Run(loader, model, model, optimizer, scheduler, scaler, autocast, method,
                jsd_lambda, rank, world_size, Path(checkpoint) if checkpoint else None,
                dict(checkpoint_meta or {}))


def _resume(run: _Run, announce: bool) -> None:
    """Continue from the checkpoint when it exists: weights, optimizer, schedule, loader
    position and random state, exactly as saved."""
    path = run.path
    if path is None or not path.exists():
        if announce:
            print(f"no checkpoint at {path}: starting from scratch", flush=True)
        return
    state = load_checkpoint(path)
    _check_resumable(state, run.method, run.meta, path)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    # every rank's loader state: the same world size continues as it was, another one
    # deals the rest of the epoch to the ranks it has now (elastic resume)
    run.loader.load_state_dict(state["loaders"])
    set_rng_state(state["rng"])
    run.step, run.start_epoch = int(state["step"]), int(state["epoch"])
    if announce:
        print(f"resumed from {path}: step {run.step}, epoch {run.start_epoch + 1}", flush=True)


def _step(run: _Run, batch: AugMixBatch) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the loss."""
    loss = _forward_loss(run.net, batch, run.method, run.jsd_lambda, run.autocast)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    return loss


class Interrupted(TrainError):
    """Ctrl-C or SIGTERM stopped training; the checkpoint (if any) was saved first. ``code``
    is the conventional exit status: 130 after Ctrl-C, 143 after SIGTERM."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class StreamFailed(TrainError):
    """The data stream failed (its dispatcher said why, or it went silent); the checkpoint of
    the last completed step was saved first. ``cause`` is the loader's exception."""

    code = 1

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def _tensorboard(folder: str | os.PathLike[str] | None) -> Any:
    """A TensorBoard writer for ``folder`` (None: none); a clear error without tensorboard."""
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install "
                         "tensorboard") from None
    return SummaryWriter(log_dir=os.fspath(folder))


def _evaluate_epoch(run: _Run, eval_set: tuple[np.ndarray, np.ndarray], epoch: int,
                    writer: Any, show: bool) -> float:
    """Clean error of the model on ``eval_set`` after ``epoch``; printed and logged."""
    x, y = eval_set
    config = run.loader.config
    probs = predict(run.model, x, mean=config.mean, std=config.std,
                    device=next(run.model.parameters()).device)
    error = float((probs.argmax(1) != y).mean())
    if show:
        print(f"epoch {epoch + 1}: clean test error {error:.2%} ({len(y)} samples)",
              flush=True)
    if writer is not None:
        writer.add_scalar("eval/clean_error", error, run.step)
    return error


def _save(run: _Run, pending: AugMixBatch | None = None) -> None:
    """Checkpoint on rank 0 with every rank's loader state (a collective under DDP: every
    rank calls it at the same steps); ``pending``: this rank's batch that was not trained on,
    left to the resumed run."""
    if run.path is None:
        return
    mine = run.loader.state_dict(pending)
    loaders = [mine]
    if run.world_size > 1:
        loaders = [None] * run.world_size  # type: ignore[list-item]
        dist.all_gather_object(loaders, mine)
    if run.rank != 0:
        return
    job = run.loader.config
    save_checkpoint({
        **run.meta,
        "model": run.model.state_dict(), "mean": tuple(job.mean), "std": tuple(job.std),
        "preprocess": job.preprocess,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "loader": loaders[run.rank], "loaders": loaders, "epoch": run.loader.epoch,
        "step": run.step, "method": run.method, "rng": rng_state(),
    }, run.path)  # fmt: skip


def _next_batch(batches: Iterator[AugMixBatch], stop: StopRequest
                ) -> tuple[AugMixBatch | None, int, BaseException | None]:
    """The next batch and what this rank has at this step boundary (see
    :mod:`client.programs.stopping`), with the loader's error when its stream failed."""
    if stop.requested:
        return None, STOP, None
    try:
        batch = next(batches, None)
    except LoaderInterrupted:
        return None, STOP, None
    except Exception as exc:  # the stream failed: saved, then reported (see _stop)
        return None, FAILED, exc
    if stop.requested:  # asked while the batch arrived: it is left to the resumed run
        return batch, STOP, None
    return batch, (END if batch is None else STEP), None


def _stop(run: _Run, batch: AugMixBatch | None, failure: BaseException | None,
          stop: StopRequest, agreement: RankAgreement, show: bool) -> None:
    """Every rank stops before this step: save the last completed step (each rank's batch in
    hand goes back to the plan), then raise :class:`StreamFailed` or :class:`Interrupted`."""
    reasons = agreement.reasons(f"{type(failure).__name__}: {failure}" if failure else None)
    _save(run, pending=batch)
    where = (f"checkpoint {run.path} holds step {run.step} (resume with --resume)"
             if run.path else "no checkpoint (--checkpoint PATH keeps one)")
    epoch = run.loader.epoch + 1
    if reasons:
        cause = reasons[0] if run.world_size > 1 else reasons[0].partition(": ")[2]
        raise StreamFailed(f"the data stream failed at step {run.step} (epoch {epoch}): "
                           f"{cause}\n{where}", failure)
    raise Interrupted(f"interrupted at step {run.step} (epoch {epoch}): {where}",
                      stop.exit_code)


def train(
    loader: RemoteAugMixLoader,
    model: nn.Module,
    *,
    method: str = "augmix+jsd",
    epochs: int = 100,
    max_steps: int | None = None,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    jsd_lambda: float = 12.0,
    device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    checkpoint_meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    bar: bool | None = None,
    log_every: int = 50,
    log_seconds: float = 10.0,
    index_log: str | os.PathLike[str] | None = None,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    eval_every: int = 0,
    tensorboard: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train ``model`` on ``loader``'s stream with ``method`` (one of :data:`METHODS`).

    SGD (nesterov) with the per-step cosine schedule over ``epochs * len(loader)`` steps;
    ``max_steps`` stops early (the schedule is unchanged, so a run can be continued). The
    model is moved to ``device`` (channels_last + autocast on CUDA) and wrapped in
    DistributedDataParallel when torch.distributed runs more than one process.

    ``checkpoint`` is saved every ``checkpoint_every`` steps (0: only at the end) and at the
    end, on rank 0; ``checkpoint_meta`` (model_name, num_classes, args) is stored with it.
    ``resume`` continues from it when the file exists. ``progress``: print (rank 0 only) a tqdm
    bar per epoch when ``bar`` (default: stderr is a terminal), else a line every
    ``log_every`` steps and at least every ``log_seconds``, and a summary line at the end.
    ``index_log``: a folder where each rank appends the dataset indices it trained on
    (``rank{R}.txt``, one line per batch: epoch, then the indices), to audit sharding and
    resumption. ``eval_set`` (``(x, y)`` uint8 test images at the job's size and labels) is
    evaluated on rank 0 every ``eval_every`` epochs (clean error); ``tensorboard``: a folder
    where rank 0 writes the training figures and those errors for TensorBoard.

    Ctrl-C or SIGTERM stops the run before its next step (a wait for data ends at once; a
    second signal stops at once without saving): the checkpoint, when there is one, holds the
    last completed step, so a resume neither replays nor skips a batch; then it raises
    :class:`Interrupted`, whose message says where the run stopped and how to resume it. A
    stream that fails is saved the same way and raises :class:`StreamFailed`. Under
    torch.distributed every rank stops at the same step.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    check_method(loader.config, method, loader.address)
    device = torch.device(device)
    run = _setup(loader, model, method=method, epochs=epochs, lr=lr, momentum=momentum,
                 weight_decay=weight_decay, jsd_lambda=jsd_lambda, device=device,
                 checkpoint=checkpoint, checkpoint_meta=checkpoint_meta)
    show = progress and run.rank == 0
    steps_per_epoch = len(loader)  # a whole epoch on this run's ranks
    if resume:
        _resume(run, announce=show)
    if run.world_size > 1:
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # The steps left: the rest of the current epoch (after an elastic resume, what the old
    # ranks left, dealt to these), then whole epochs.
    planned = run.step + loader.batches_left() + max(epochs - run.start_epoch - 1, 0) * (
        steps_per_epoch)
    stop_at = planned if max_steps is None else min(max_steps, planned)
    writer = _tensorboard(tensorboard) if run.rank == 0 else None
    reporter = _Progress(show, sys.stderr.isatty() if bar is None else bar, log_every, stop_at,
                         log_seconds, writer)
    meter = _Meter(run.world_size)
    first_step = run.step
    indices = _index_file(index_log, run.rank)
    agreement = RankAgreement(run.world_size)
    start = time.perf_counter()
    stop = StopRequest(loader)
    try:
        with stop.installed():
            for epoch in range(run.start_epoch, epochs):
                if run.step >= stop_at:
                    break
                loader.set_epoch(epoch)
                run.net.train()
                this_epoch = len(loader)
                reporter.start_epoch(epoch, epochs, this_epoch,
                                     this_epoch - loader.batches_left())
                batches: Iterator[AugMixBatch] = iter(loader)
                try:
                    while run.step < stop_at:
                        t0 = time.perf_counter()
                        batch, have, failure = _next_batch(batches, stop)
                        verdict = agreement.verdict(have)
                        if verdict >= STOP:
                            _stop(run, batch, failure, stop, agreement, show)
                        if verdict == END:
                            break
                        assert batch is not None
                        t1 = time.perf_counter()
                        loss = _step(run, batch)
                        meter.add(t1 - t0, time.perf_counter() - t0, len(batch), loss)
                        if indices is not None:
                            indices.write(f"{epoch} {' '.join(map(str, batch.index.tolist()))}\n")
                        reporter.step(run.step, meter, run.scheduler.get_last_lr()[0])
                        if checkpoint_every and run.step % checkpoint_every == 0 \
                                and run.step < stop_at:
                            _save(run)
                finally:
                    batches.close()  # type: ignore[attr-defined]
                    reporter.end_epoch()
                if eval_every and eval_set is not None and (epoch + 1) % eval_every == 0 \
                        and run.rank == 0 and loader.batches_left() == 0:
                    _evaluate_epoch(run, eval_set, epoch, writer, show)
            _save(run)
    except KeyboardInterrupt as again:  # a second signal: at once, without saving
        code = 143 if isinstance(again, Terminated) else 130
        raise Interrupted(f"interrupted again at step {run.step} (epoch {loader.epoch + 1}): "
                          "stopped at once without saving; the last checkpoint saved stays",
                          code) from None
    finally:
        if indices is not None:
            indices.close()
        if writer is not None:
            writer.close()
    result = TrainResult(
        steps=run.step - first_step, last_step=run.step, epoch=loader.epoch,
        samples=meter.samples, seconds=time.perf_counter() - start, losses=meter.loss_values(),
        first_batch_seconds=meter.first_batch or 0.0,
        data_wait=meter.wait / meter.time if meter.time > 0 else 0.0,
    )
    if show:
        resumed = f" ({result.last_step} in all)" if result.last_step != result.steps else ""
        print(f"done: {result.steps} steps{resumed} in {result.seconds:.1f} s: "
              f"first batch after {result.first_batch_seconds:.2f} s (start-up and warm-up), "
              f"then {result.samples_per_second:.1f} samples/s, mean data-wait "
              f"{result.data_wait:.0%}; final loss {result.final_loss:.4f}", flush=True)
    return result


def _check_resumable(
    state: Mapping[str, Any], method: str, meta: Mapping[str, Any], path: Path
) -> None:
    if state.get("method") != method:
        raise TrainError(f"{path} was trained with method {state.get('method')!r}, "
                         f"this run is {method!r}")
    for key in ("model_name", "num_classes", "image_size"):
        if key in meta and state.get(key, meta[key]) != meta[key]:
            raise TrainError(f"{path} holds {key} {state.get(key)!r}, this run has {meta[key]!r}")


def _index_file(folder: str | os.PathLike[str] | None, rank: int) -> TextIO | None:
    if folder is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(Path(folder) / f"rank{rank}.txt", "a")  # closed by train()


# ---------------------------------------------------------------------------- evaluation


def evaluate_test_set(
    model: nn.Module, source: str, *, method: str, preprocess: str, limit: int | None,
    mean: tuple[float, ...], std: tuple[float, ...], cache_dir: str | os.PathLike[str],
    device: torch.device, results: str | os.PathLike[str] | None = None, seed: int = 0,
    image_size: int | None = None,
) -> dict[str, Any]:
    """Robustness evaluation of ``model`` on a test set (clean and corrupted; ``source``, as
    :func:`client.robustness.evaluation.load_test_set` takes it): print the table, write
    ``results`` JSON when given, return ``{method: result}``."""
    x, y = load_test_set(source, preprocess, limit, image_size)
    model.eval()
    result = {method: evaluate(model, x, y, mean=mean, std=std, cache_dir=cache_dir,
                               device=str(device), seed=seed)}
    print(format_table(result), flush=True)
    if results is not None:
        write_json(result, results)
        print(f"results written to {results}", flush=True)
    return result


# ---------------------------------------------------------------------------- command line


def _dataset_arg(text: str) -> tuple[str, str]:
    fmt, sep, path = text.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise argparse.ArgumentTypeError(
            f"expected FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}, got {text!r}"
        )
    return fmt, path


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m client.programs.train`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m client.programs.train", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_argument_group("data").add_mutually_exclusive_group(required=True)
    source.add_argument("--connect", metavar="tcp://HOST:PORT", type=connect_address,
                        help="a running dispatcher")
    source.add_argument("--dataset", type=_dataset_arg, metavar="FORMAT:PATH",
                        help=f"start a local dispatcher on this dataset ({', '.join(FORMATS)})")
    local = p.add_argument_group("local dispatcher (with --dataset)")
    local.add_argument("--workers", type=positive_int, default=2, help="local worker processes")
    local.add_argument("--batch-size", type=positive_int, default=None,
                       help="batch size per rank [128]; with --connect the job's")
    local.add_argument("--preprocess", choices=preprocessing.NAMES, default=None,
                       help="[cifar for cifar10/100 and for npz of images <= 64 px, else "
                            "imagenet]")
    local.add_argument("--image-size", type=positive_int, default=None, metavar="PIXELS",
                       help="side of the training views [32 with cifar, 224 with imagenet]")
    local.add_argument("--severity", type=int, default=None,
                       help="AugMix severity [3 with cifar, 1 with imagenet]")
    local.add_argument("--server-log-level", default="WARNING", help="the dispatcher's log level")
    method = p.add_argument_group("method").add_mutually_exclusive_group()
    method.add_argument("--no-jsd", action="store_true",
                        help="one AugMix view per sample, cross-entropy (method augmix)")
    method.add_argument("--standard", action="store_true",
                        help="no AugMix: plain preprocessing, cross-entropy (method standard)")
    opt = p.add_argument_group("model and optimisation")
    opt.add_argument("--model", choices=MODELS, default="wrn40_2")
    opt.add_argument("--num-classes", type=positive_int, default=None,
                     help="[the dataset's, as the dispatcher reports it]")
    opt.add_argument("--epochs", type=positive_int, default=100)
    opt.add_argument("--max-steps", "--steps", dest="max_steps", type=positive_int, default=None,
                     help="stop after this many steps in all (smoke runs; the schedule still "
                          "spans --epochs)")
    opt.add_argument("--lr", type=float, default=0.1)
    opt.add_argument("--weight-decay", type=float, default=5e-4)
    opt.add_argument("--jsd-lambda", type=float, default=12.0)
    opt.add_argument("--seed", type=int, default=0, help="model init (and the local job's seed)")
    opt.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opt.add_argument("--ordered", action="store_true",
                     help="batches in plan order: a bit-for-bit reproducible input stream")
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint", metavar="PATH", default=None)
    ckpt.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                      help="0: only at the end")
    ckpt.add_argument("--resume", action="store_true",
                      help="continue from --checkpoint when it exists")
    ev = p.add_argument_group("evaluation (rank 0, at the end)")
    ev.add_argument("--eval-test", "--eval-npz", dest="eval_test", metavar="SOURCE",
                    default=None, help="an npz (x: N x H x W x 3 uint8, y: labels) or "
                                       "FORMAT:PATH of a dataset's test split")
    ev.add_argument("--eval-limit", type=positive_int, default=None,
                    help="evaluate a seeded random subset of this many test samples")
    ev.add_argument("--eval-cache", metavar="DIR", default=None,
                    help="corrupted test sets cache [next to the test set, corrupted/]")
    ev.add_argument("--results", metavar="JSON", default=None)
    ev.add_argument("--eval-every", type=positive_int, default=None, metavar="EPOCHS",
                    help="also the clean error on --eval-test every EPOCHS epochs (rank 0)")
    out = p.add_argument_group("output")
    out.add_argument("--no-progress", action="store_true",
                     help="a line every --log-every steps instead of a tqdm bar")
    out.add_argument("--log-every", type=positive_int, default=50, metavar="STEPS")
    out.add_argument("--log-seconds", type=float, default=10.0, metavar="SECONDS",
                     help="also a line at least this often (piped output)")
    out.add_argument("--tensorboard", metavar="DIR", default=None,
                     help="write loss, lr, samples/s, data-wait and eval errors for TensorBoard")
    out.add_argument("--traceback", action="store_true",
                     help="print the traceback of a failed data stream (its cause alone by "
                          "default)")
    out.add_argument("--index-log", metavar="DIR", default=None,
                     help="each rank appends the dataset indices it trained on to DIR/rankR.txt")
    return p


def _method(args: argparse.Namespace) -> str:
    return "standard" if args.standard else "augmix" if args.no_jsd else "augmix+jsd"


def _setup_device(name: str) -> torch.device:
    """The device, after joining the process group when torchrun runs several processes."""
    device = torch.device(name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv: list[str] | None = None) -> int:
    """``python -m client.programs.train``; returns the exit status (2 for a usage or job error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    method = _method(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.connect is None:
        parser.error("under torchrun (WORLD_SIZE > 1) pass --connect tcp://HOST:PORT: all ranks "
                     "share one dispatcher (start it with `augserver serve`)")
    if args.connect is not None and args.batch_size is not None:
        parser.error("--batch-size needs --dataset: with --connect the dispatcher's job sets it")
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint PATH")
    if args.eval_every is not None and args.eval_test is None:
        parser.error("--eval-every needs --eval-test SOURCE")
    device = _setup_device(args.device)
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    # Ctrl-C saves too, also where SIGINT came ignored (a job started with & from a script)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    completed = False
    try:
        with contextlib.ExitStack() as stack:
            if args.connect is not None:
                address = args.connect
            else:
                fmt, path = args.dataset
                job = job_config(fmt, path, method=method, batch_size=args.batch_size or 128,
                                 seed=args.seed,
                                 preprocess=args.preprocess or _small_image_preprocess(fmt, path),
                                 severity=args.severity, image_size=args.image_size)
                address = stack.enter_context(
                    local_server(job, args.workers, log_level=args.server_log_level))
            status = _run(args, method, address, device)
            completed = True
            return status
    except Interrupted as exc:
        if world()[0] == 0:  # every rank stopped at the same step: one line says so
            print(exc, file=sys.stderr)
        return exc.code
    except StreamFailed as exc:
        if world()[0] == 0:
            if args.traceback and exc.cause is not None:
                traceback.print_exception(exc.cause, file=sys.stderr)
            print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt as stop:  # before training started: nothing to save
        print("interrupted before training started", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except (TrainError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        _leave_process_group(completed)


def _leave_process_group(completed: bool) -> None:
    """Destroy the process group, after a barrier when this rank completed: no rank tears its
    connections down while another still uses them (rank 1 aborted in gloo's teardown once in
    CI without it). After a failure, no barrier: the other ranks may never come."""
    if dist.is_available() and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def _small_image_preprocess(fmt: str, path: str) -> str | None:
    """``cifar`` for an npz of images of at most 64 pixels a side (the job's own default,
    ImageNet's 224 crops, would upscale them 7x); None (the job's default) otherwise."""
    if fmt != "npz":
        return None
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            version = np.lib.format.read_magic(member)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape = read(member)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # the dispatcher reports what is wrong with the file
    if len(shape) >= 3 and preprocessing.for_images(*shape[1:3]) is preprocessing.CIFAR:
        print(f"{path}: {shape[1]}x{shape[2]} images: preprocess cifar (32x32 crops; "
              "--preprocess imagenet for 224x224)", flush=True)
        return "cifar"
    return None


def _interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (docker stop, torchrun, a batch scheduler) is handled as Ctrl-C: the checkpoint
    is saved and the local dispatcher stopped on the way out."""
    raise Terminated


def _run(args: argparse.Namespace, method: str, address: str, device: torch.device) -> int:
    cuda = device.type == "cuda"
    loader = RemoteAugMixLoader(address, ordered=args.ordered, device=device, channels_last=cuda)
    job = loader.config
    check_method(job, method, address)
    rank, world_size = world()
    num_classes = args.num_classes or loader.num_classes
    if num_classes < loader.num_classes:
        raise TrainError(f"--num-classes {num_classes} is fewer than the {loader.num_classes} "
                         f"classes of {job.dataset.format}:{job.dataset.path} (labels up to "
                         f"{loader.num_classes - 1}): the loss would fail on the first batch")
    if rank == 0:
        print(f"{method} on {job.dataset.format}:{job.dataset.path} from {address}: "
              f"{args.model} ({num_classes} classes), {len(loader)} batches/epoch of "
              f"{job.batch_size} x {world_size} rank(s), {args.epochs} epochs, {device}",
              flush=True)
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes, job.image_size)
    meta = {"model_name": args.model, "num_classes": num_classes,
            "image_size": job.image_size, "args": vars(args)}
    eval_set = None
    if args.eval_every is not None and rank == 0:
        eval_set = load_test_set(args.eval_test, preprocess=job.preprocess,
                                 limit=args.eval_limit, image_size=job.image_size)
    train(loader, model, method=method, epochs=args.epochs, max_steps=args.max_steps,
          lr=args.lr, weight_decay=args.weight_decay, jsd_lambda=args.jsd_lambda,
          device=device, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
          resume=args.resume, checkpoint_meta=meta, bar=False if args.no_progress else None,
          log_every=args.log_every, log_seconds=args.log_seconds, index_log=args.index_log,
          eval_set=eval_set, eval_every=args.eval_every or 0, tensorboard=args.tensorboard)
    if args.eval_test is not None and rank == 0:
        where = Path(args.eval_test.partition(":")[2] if ":" in args.eval_test else args.eval_test)
        cache = args.eval_cache or where.resolve().parent / "corrupted"
        evaluate_test_set(model, args.eval_test, method=method, preprocess=job.preprocess,
                          limit=args.eval_limit, mean=job.mean, std=job.std,
                          cache_dir=cache, device=device, results=args.results, seed=args.seed,
                          image_size=job.image_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
