"""AugMix through augserver in PyTorch Lightning: a ``LightningDataModule`` and a module.

    python -m client.programs.lightning_example --connect tcp://HOST:5555 [--devices 2]

:class:`AugMixDataModule` hands Lightning a :class:`~client.RemoteAugMixLoader` as its
training data. Lightning iterates it once per epoch without calling ``set_epoch``; the loader
moves to the next epoch by itself. Under DDP (``--devices N`` with ``strategy="ddp"``, here on
CPU with gloo) each process's loader takes its rank and world size from ``torch.distributed``,
which Lightning has initialised by the time it asks for the data, so every rank gets its own
share with the same number of batches. The loader runs with ``as_tuples=True``: the module sees
``(images, target)`` with ``images`` the ``3B`` batch (clean, aug1, aug2), as timm does, and
trains with :func:`client.loss.jsd_loss_from_concat`.

Lightning is optional (``pip install lightning``); this example is the only place that needs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning
import torch

from client.loader import RemoteAugMixLoader
from client.loss import jsd_loss_from_concat
from client.programs.models import build_model


class AugMixDataModule(lightning.LightningDataModule):
    """The training data of a job served by the dispatcher at ``address``."""

    def __init__(self, address: str, **loader_args: Any) -> None:
        super().__init__()
        self.address = address
        self.loader_args = loader_args
        self.loader: RemoteAugMixLoader | None = None

    def train_dataloader(self) -> RemoteAugMixLoader:
        if self.loader is None:  # made once: it carries the epoch from one fit epoch to the next
            self.loader = RemoteAugMixLoader(self.address, as_tuples=True, **self.loader_args)
        return self.loader


class AugMixModule(lightning.LightningModule):
    """A classifier trained with the AugMix loss on ``(3B images, target)`` batches."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.05,
                 index_log: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.index_log = index_log
        self.epoch_losses: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, target = batch
        loss = jsd_loss_from_concat(self.model(images), target)
        self.log("train_loss", loss, prog_bar=True)
        self.epoch_losses.append(loss.detach())
        if self.index_log is not None:
            with open(Path(self.index_log) / f"rank{self.global_rank}.txt", "a") as f:
                f.write(f"{self.current_epoch} {len(target) // 3}\n")
        return loss

    def on_train_epoch_end(self) -> None:
        """One line per epoch on rank 0 (the example runs without a logger or progress bar):
        the epoch's mean training loss over this rank's steps."""
        if self.epoch_losses and self.global_rank == 0:
            mean = torch.stack(self.epoch_losses).mean().item()
            print(f"epoch {self.current_epoch + 1}: mean loss {mean:.4f} over "
                  f"{len(self.epoch_losses)} steps", flush=True)
        self.epoch_losses.clear()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.programs.lightning_example",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--connect", required=True, help="the dispatcher, tcp://HOST:PORT")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP when > 1)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--index-log", default=None,
                        help="each rank appends 'epoch batch-size' per step to DIR/rankR.txt")
    args = parser.parse_args(argv)
    data = AugMixDataModule(args.connect, ordered=True, timeout=120)
    probe = RemoteAugMixLoader(args.connect, rank=0, world_size=1)  # the job: classes, size
    model = build_model(args.model, probe.num_classes, probe.image_size)
    if args.index_log is not None:
        Path(args.index_log).mkdir(parents=True, exist_ok=True)
    trainer = lightning.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(AugMixModule(model, index_log=args.index_log), datamodule=data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
