"""A small real-data robustness study: standard vs AugMix vs AugMix + JSD on scikit-learn's digits.

    python -m client.programs.study [--epochs 30] [--workers 2] [--out study] [--seed 0]
        [--methods standard augmix augmix+jsd] [--batch-size 64]
        [--corruptions NAME ...] [--severities S ...]

The data are scikit-learn's handwritten digits (1797 real 8x8 scans shipped with the package,
upscaled to 32x32 RGB: :mod:`client.programs.digits`), split once into a stratified, seeded 80/20
train/test split. For each method the study starts its own dispatcher with ``--workers`` local
workers (``preprocess: cifar``; ``augment: none`` for ``standard``, ``jsd: false`` for
``augmix``), and trains ``small_cnn`` from the same seed for the same epochs with the same
recipe (:func:`client.programs.train.train`: SGD nesterov, lr 0.1 cosine per step, weight
decay 5e-4; JSD lambda 12 for ``augmix+jsd``), ordered batches so the run is reproducible.
Each model is then evaluated (:func:`client.robustness.evaluation.evaluate`) on the clean test
split and its corrupted versions (the 15 CIFAR-10-C corruptions at severities 1..5 by default,
made locally and cached in ``OUT/corrupted``).

It prints the table, writes ``OUT/study.json`` (the evaluation of each method plus its
training figures under ``"training"``) and ``OUT/study.png`` (error vs severity, when
matplotlib is installed), and prints the total time. The default budget runs in a few minutes
on two CPU cores.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.loader import RemoteAugMixLoader
from client.programs.digits import digits_split
from client.programs.local_server import local_server
from client.programs.models import small_cnn
from client.programs.train import METHODS, job_config, train
from client.robustness.evaluation import evaluate, format_table, plot_error_vs_severity, write_json


def run_study(
    out: str | Path,
    *,
    methods: Sequence[str] = METHODS,
    epochs: int = 30,
    workers: int = 2,
    seed: int = 0,
    batch_size: int = 64,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    log_every: int = 100,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate ``small_cnn`` once per method; return ``{method: evaluate result}``
    (each with a ``"training"`` entry) and write ``out/study.json`` (+ ``study.png``).

    ``corruptions`` / ``severities`` narrow the corrupted test sets (default: all 15 x 1..5).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {list(methods)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = digits_split(seed)
    train_npz = out / "digits_train.npz"
    np.savez(train_npz, x=x_train, y=y_train)
    np.savez(out / "digits_test.npz", x=x_test, y=y_test)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images (32x32 RGB), small_cnn, "
          f"{epochs} epochs of batch {batch_size}, {workers} server workers", flush=True)
    selection: dict[str, Any] = {}
    if corruptions is not None:
        selection["names"] = tuple(corruptions)
    if severities is not None:
        selection["severities"] = tuple(severities)

    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        job = job_config("npz", train_npz, method=method, batch_size=batch_size, seed=seed,
                         preprocess="cifar")
        torch.manual_seed(seed)
        model = small_cnn(10)
        print(f"--- {method}", flush=True)
        with local_server(job, workers) as address:
            loader = RemoteAugMixLoader(address, ordered=True, timeout=120)
            mean, std = loader.config.mean, loader.config.std
            trained = train(loader, model, method=method, epochs=epochs, bar=False,
                            log_every=log_every)
        started = time.perf_counter()
        result = evaluate(model, x_test, y_test, mean=mean, std=std, cache_dir=out / "corrupted",
                          seed=seed, **selection)
        print(f"evaluated in {time.perf_counter() - started:.1f} s: clean error "
              f"{result['clean']['error']:.2%}, mCE {result['mean_corruption_error']:.2%}",
              flush=True)
        result["training"] = {
            "steps": trained.steps,
            "epochs": epochs,
            "seconds": trained.seconds,
            "samples_per_second": trained.samples_per_second,
            "first_batch_seconds": trained.first_batch_seconds,
            "final_loss": trained.final_loss,
            "data_wait": trained.data_wait,
        }
        results[method] = result

    print()
    print(format_table(results))
    write_json(results, out / "study.json")
    written = [str(out / "study.json")]
    if plot_error_vs_severity(results, out / "study.png"):
        written.append(str(out / "study.png"))
    print(f"\nwritten: {', '.join(written)}")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m client.programs.study``."""
    parser = argparse.ArgumentParser(
        prog="python -m client.programs.study", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=30, help="epochs per method")
    parser.add_argument("--workers", type=int, default=2, help="local server workers")
    parser.add_argument("--out", default="study", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="split, model init and job seed")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--corruptions", nargs="+", metavar="NAME", default=None,
                        help="corruptions to evaluate [all 15]")
    parser.add_argument("--severities", nargs="+", type=int, metavar="S", default=None,
                        help="severities to evaluate [1 2 3 4 5]")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run_study(args.out, methods=args.methods, epochs=args.epochs, workers=args.workers,
              seed=args.seed, batch_size=args.batch_size, corruptions=args.corruptions,
              severities=args.severities)
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
