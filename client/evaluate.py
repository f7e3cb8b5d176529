"""The robustness metrics the AugMix paper reports: clean error, corruption error (CIFAR-10-C
style mCE, optionally ImageNet-C's AlexNet-normalised mCE) and RMS calibration error.

    probs = predict(model, x, mean=MEAN, std=STD)                     # softmax, (N, C) float32
    result = evaluate(model, x, y, mean=MEAN, std=STD, cache_dir="cache/")
    print(format_table({"augmix": result}))
    python -m client.evaluate --checkpoint ckpt.pt --test test.npz --cache cache/ \\
        [--json out.json] [--plot out.png]
    python -m client.evaluate --checkpoint ckpt.pt --test cifar10:/data/cifar-10-batches-py ...

The test set is an ``.npz`` (``x``, ``y``) or any dataset's test split (:func:`load_test_set`).

The corrupted test sets come from :func:`client.corruptions.iter_corrupted` (made once, then
loaded from the cache). All errors are fractions in [0, 1]:

- ``error``: 1 - top-1 accuracy.
- ``mean_corruption_error`` (mCE as reported for CIFAR-10-C / CIFAR-100-C): the mean over
  corruptions of the mean error over severities, unnormalised.
- ``normalized_mce`` (ImageNet-C, only when a ``baseline`` is given): the mean over corruptions
  of ``sum_s err[c][s] / sum_s baseline[c][s]``; with AlexNet's errors as the baseline this is
  the paper's ImageNet mCE divided by 100 (ResNet-50: 0.806 standard, 0.684 AugMix).
  :data:`ALEXNET_MEAN_ERRORS` holds AlexNet's published per-corruption errors (mean over the
  severities, from github.com/hendrycks/robustness, also in google-research/augmix's
  imagenet.py); :func:`alexnet_baseline` turns them into a ``baseline``.
- ``rms_calibration_error``: see :func:`rms_calibration_error`;
  ``mean_corruption_rms_calibration_error`` is its mean over every corruption and severity.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from augserver.text import render_table
from client.corruptions import CORRUPTIONS, SEVERITIES, default_params, iter_corrupted

__all__ = [
    "ALEXNET_MEAN_ERRORS",
    "alexnet_baseline",
    "evaluate",
    "format_table",
    "load_checkpoint_model",
    "load_test_set",
    "main",
    "plot_error_vs_severity",
    "predict",
    "rms_calibration_error",
    "write_json",
]

# AlexNet's ImageNet-C top-1 error per corruption, averaged over the five severities.
ALEXNET_MEAN_ERRORS: dict[str, float] = dict(
    zip(
        CORRUPTIONS,
        (0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816,
         0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500),
        strict=True,
    )
)  # fmt: skip


def alexnet_baseline() -> dict[str, list[float]]:
    """An ImageNet-C ``baseline`` for :func:`evaluate` from :data:`ALEXNET_MEAN_ERRORS`.

    Only per-corruption means are published, so each severity gets the mean; the normalised
    mCE only uses the sum over severities, which this keeps exact (for all five severities).
    """
    return {name: [err] * len(SEVERITIES) for name, err in ALEXNET_MEAN_ERRORS.items()}


# ------------------------------------------------------------------------------ calibration


def rms_calibration_error(confidence: np.ndarray, correct: np.ndarray, beta: int = 100) -> float:
    """RMS calibration error with adaptive bins, as ``calib_err(confidence, correct, p='2',
    beta)`` in the Hendrycks et al. calibration tools used for the AugMix paper.

    Samples are sorted by confidence and cut into bins of ``beta`` consecutive samples, the last
    bin absorbing the remainder (fewer than ``beta`` samples make one bin). The result is
    ``sqrt(sum_b |b| / N * (mean confidence in b - accuracy in b) ** 2)``.

    One deliberate difference: the reference loop runs over ``range(len(bins) - 1)``, which
    leaves the last (most confident) bin out of the sum while still dividing by all N, and
    fails on fewer than ``beta`` samples. Here every bin counts, so perfectly calibrated
    predictions give 0 and confidently wrong ones give 1.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(
            f"confidence and correct must have the same length, got {conf.size} and {corr.size}"
        )
    if conf.size == 0:
        raise ValueError("rms_calibration_error needs at least one sample")
    if isinstance(beta, bool) or not isinstance(beta, int | np.integer) or beta < 1:
        raise ValueError(f"beta must be a positive integer, got {beta!r}")
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], corr[order]
    n = conf.size
    edges = [i * beta for i in range(max(1, n // beta))] + [n]
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        gap = conf[lo:hi].mean() - corr[lo:hi].mean()
        total += (hi - lo) / n * gap * gap
    return math.sqrt(total)


# ------------------------------------------------------------------------------ prediction


def predict(
    model: nn.Module,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` float32 of ``model`` on N x H x W x 3 uint8 images.

    Pixels go to ``device`` as uint8, become NCHW float ``/ 255`` normalised by ``mean`` / ``std``
    there, and run under ``torch.inference_mode`` with the model in eval mode (every submodule's
    train/eval mode is restored afterwards). On CUDA the input is channels_last and the forward
    pass runs under autocast (float16); probabilities are computed in float32. The model must
    already be on ``device``.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        what = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images must be a uint8 numpy array, got {what}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be N x H x W x 3 (NHWC), got shape {images.shape}")
    if len(images) == 0:
        raise ValueError("images is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(f"model is on {param.device} but device is {device}")
    cuda = device.type == "cuda"
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
                x = chunk.to(device, non_blocking=cuda).permute(0, 3, 1, 2).float()
                x = (x / 255.0 - mean_t) / std_t
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device_type="cuda", dtype=torch.float16):
                        logits = model(x)
                else:
                    logits = model(x)
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    finally:
        for module, training in modes:
            module.training = training
    return np.concatenate(out).astype(np.float32, copy=False)


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    correct = probs.argmax(axis=1) == labels
    return {
        "error": float(1.0 - correct.mean()),
        "rms_calibration_error": rms_calibration_error(probs.max(axis=1), correct),
    }


def _progress(total: int, enabled: bool):
    """A tqdm bar when asked for and tqdm is importable, else None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="corruptions", unit="set")


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    cache_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    seed: int = 0,
    names: Iterable[str] = CORRUPTIONS,
    severities: Iterable[int] = SEVERITIES,
    params: str | None = None,
    progress: bool = False,
    baseline: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Clean and corruption metrics of ``model`` on ``images`` (NHWC uint8) / ``labels`` (N,).

    Returns a JSON-serialisable dict::

        {"clean": {"error": e, "rms_calibration_error": c},
         "corruptions": {name: {"1": {"error": ..., "rms_calibration_error": ...}, ...}},
         "mean_corruption_error": mCE,                      # mean over names of mean over sev.
         "mean_corruption_rms_calibration_error": ...,      # mean over every name x severity
         "normalized_mce": ...,                             # only with a baseline
         "settings": {"num_images", "seed", "params", "names", "severities"}}

    ``baseline`` maps each corruption to its baseline errors for severities 1..5 (e.g.
    :func:`alexnet_baseline`); ``normalized_mce`` is the mean over corruptions of
    ``sum(err) / sum(baseline err)`` over the evaluated severities. Corrupted sets come from
    (and go to) ``cache_dir`` via :func:`client.corruptions.iter_corrupted`.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    severities = tuple(severities)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if not isinstance(images, np.ndarray) or len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length, got "
                         f"{getattr(images, 'shape', None)} and {labels.shape}")  # fmt: skip
    if baseline is not None:
        for name in names:
            if name not in baseline or len(baseline[name]) != len(SEVERITIES):
                raise ValueError(f"baseline needs {len(SEVERITIES)} errors for {name!r}")
    sets = iter_corrupted(
        images, cache_dir, seed=seed, names=names, severities=severities, params=params
    )
    run = {"mean": mean, "std": std, "batch_size": batch_size, "device": device}
    clean = _metrics(predict(model, images, **run), labels)
    corruptions: dict[str, dict[str, dict[str, float]]] = {}
    bar = _progress(len(names) * len(severities), progress)
    try:
        for name, severity, corrupted in sets:
            corruptions.setdefault(name, {})[str(severity)] = _metrics(
                predict(model, corrupted, **run), labels
            )
            if bar is not None:
                bar.set_postfix_str(f"{name}-{severity}")
                bar.update()
            elif progress:
                err = corruptions[name][str(severity)]["error"]
                print(f"  {name}-{severity}: error {err:.4f}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    per_name = [np.mean([r["error"] for r in corruptions[n].values()]) for n in names]
    calib = [r["rms_calibration_error"] for n in names for r in corruptions[n].values()]
    result: dict[str, Any] = {
        "clean": clean,
        "corruptions": corruptions,
        "mean_corruption_error": float(np.mean(per_name)),
        "mean_corruption_rms_calibration_error": float(np.mean(calib)),
    }
    if baseline is not None:
        ratios = [
            sum(corruptions[n][str(s)]["error"] for s in severities)
            / sum(baseline[n][s - 1] for s in severities)
            for n in names
        ]
        result["normalized_mce"] = float(np.mean(ratios))
    result["settings"] = {
        "num_images": len(images),
        "seed": seed,
        "params": params or default_params(images.shape[1], images.shape[2]),
        "names": list(names),
        "severities": list(severities),
    }
    return result


# -------------------------------------------------------------------------------- reporting


def _mean_error(result: Mapping[str, Any], name: str) -> float | None:
    per_severity = result.get("corruptions", {}).get(name)
    if not per_severity:
        return None
    return float(np.mean([r["error"] for r in per_severity.values()]))


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text tables of :func:`evaluate` results keyed by method name (e.g. "standard",
    "augmix", "augmix+jsd"): a summary row per method (clean error, mCE, clean and corruption
    RMS calibration error, normalised mCE where present, all in %), then the error per
    corruption (mean over severities, %) with one column per method."""
    if not results:
        return "(no results)"
    methods = list(results)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    head = ["method", "clean err %", "mCE %", "clean RMS calib %", "corr. RMS calib %"]
    with_norm = any("normalized_mce" in r for r in results.values())
    if with_norm:
        head.append("norm. mCE %")
    rows = []
    for m in methods:
        r = results[m]
        row = [
            m,
            pct(r["clean"]["error"]),
            pct(r["mean_corruption_error"]),
            pct(r["clean"]["rms_calibration_error"]),
            pct(r["mean_corruption_rms_calibration_error"]),
        ]
        if with_norm:
            row.append(pct(r.get("normalized_mce")))
        rows.append(row)
    lines = render_table(head, rows, indent="", align_right=True, rule=True)
    seen = {n for r in results.values() for n in r.get("corruptions", {})}
    names = [n for n in CORRUPTIONS if n in seen] + sorted(seen - set(CORRUPTIONS))
    per = [[n, *(pct(_mean_error(results[m], n)) for m in methods)] for n in names]
    per_lines = render_table(["corruption (error %)", *methods], per, indent="",
                             align_right=True, rule=True)
    return "\n".join([*lines, "", *per_lines])


def plot_error_vs_severity(
    results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike
) -> bool:
    """Write a PNG of the mean corruption error (over corruptions) against severity, 0 being the
    clean error, one line per method. Returns False (and writes nothing) when matplotlib is not
    importable; matplotlib is optional and imported here, with the Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, r in results.items():
        xs, ys = [0], [100 * r["clean"]["error"]]
        sevs = sorted({int(s) for per in r["corruptions"].values() for s in per})
        for s in sevs:
            errs = [per[str(s)]["error"] for per in r["corruptions"].values() if str(s) in per]
            xs.append(s)
            ys.append(100 * float(np.mean(errs)))
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("mean corruption error (%)")
    ax.set_xticks(range(0, max(SEVERITIES) + 1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return True


def write_json(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``results`` (an :func:`evaluate` result or a dict of them) as indented JSON."""
    Path(path).write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------- test sets


def load_test_set(
    source: str | os.PathLike, preprocess: str | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a test set: ``x`` N x H x W x 3 uint8, ``y`` int64 labels.

    ``source`` is an ``.npz`` file holding ``x`` and ``y`` as they are (already at the model's
    resolution), or ``FORMAT:PATH`` of a dataset (``cifar10``/``cifar100``: the test batch;
    ``imagefolder``: ``PATH/val`` when PATH holds train/ and val/, else PATH; ``npz``) whose
    images go through the test-time view of ``preprocess`` (``cifar``: the centre 32 x 32;
    ``imagenet``: resize 256, centre crop 224; default: cifar for CIFAR, else imagenet).
    ``limit`` keeps a seeded random subset of that many samples (corrupting 224 x 224 images
    costs about 1.4 s per image for all 75 sets on one core).
    """
    from augserver import preprocessing
    from augserver.datasets import FORMATS, open_dataset

    fmt, sep, path = str(source).partition(":")
    if not sep or fmt not in FORMATS:
        with np.load(source, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise ValueError(f"{source}: needs arrays x (NHWC uint8) and y (labels)")
            x, y = data["x"], data["y"].astype(np.int64)
        keep = _subset(len(x), limit)
        return (x, y) if keep is None else (x[keep], y[keep])
    view = (preprocessing.get(preprocess) if preprocess else preprocessing.default_for(fmt)).eval
    dataset = open_dataset(fmt, path, train=False)
    keep = _subset(len(dataset), limit)
    indices = np.arange(len(dataset)) if keep is None else keep
    x = np.stack([dataset.sample(i, view) for i in indices.tolist()])
    return x, dataset.labels(indices)


def _subset(n: int, limit: int | None) -> np.ndarray | None:
    """Sorted indices of a seeded random ``limit`` of ``n`` samples, or None for all."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


# ------------------------------------------------------------------------------------- CLI


def load_checkpoint_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model on ``device``, checkpoint dict) from a ``client.train`` checkpoint: a dict with
    "model" (state_dict), "model_name", "num_classes", "mean" and "std"."""
    from client.train import load_checkpoint  # imported here: only the CLI needs the trainer

    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    missing = [k for k in ("model", "model_name", "num_classes") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    from client.models import build_model  # imported here: only the CLI needs the zoo

    model = build_model(ckpt["model_name"], int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def main(argv: list[str] | None = None) -> int:
    from augserver import preprocessing
    from augserver.datasets import DatasetError

    parser = argparse.ArgumentParser(
        prog="python -m client.evaluate",
        description="Clean error, corruption error (mCE) and RMS calibration of a checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint from client.train")
    parser.add_argument("--test", "--test-npz", dest="test", required=True, metavar="SOURCE",
                        help="an npz with x (NHWC uint8) and y, or FORMAT:PATH of a dataset's "
                             "test split (cifar10:DIR, imagefolder:DIR, ...)")
    parser.add_argument("--preprocess", choices=preprocessing.NAMES, default=None,
                        help="test-time view for FORMAT:PATH [the checkpoint's job, else cifar "
                             "for CIFAR and imagenet otherwise]")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate a seeded random subset of this many test samples")
    parser.add_argument("--cache", required=True, help="cache directory for corrupted sets")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--plot", help="write error vs severity as PNG here (needs matplotlib)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="corruption seed")
    parser.add_argument(
        "--params",
        choices=("cifar", "imagenet"),
        default=None,
        help="corruption table (default: cifar if the image side is <= 64)",
    )
    parser.add_argument("--names", nargs="+", default=list(CORRUPTIONS), metavar="NAME")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), metavar="S")
    parser.add_argument(
        "--method",
        help="row name in the table (default: the checkpoint's 'method' entry, else its file name)",
    )
    parser.add_argument(
        "--alexnet-baseline",
        action="store_true",
        help="also report ImageNet-C's AlexNet-normalised mCE",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)  # fmt: skip
    try:
        model, ckpt = load_checkpoint_model(args.checkpoint, args.device)
        x, y = load_test_set(args.test, args.preprocess or ckpt.get("preprocess"), args.limit)
    except (OSError, ValueError, RuntimeError, KeyError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    side = max(x.shape[1:3]) if x.ndim == 4 else 0
    fallback = preprocessing.for_images(side, side)
    mean = tuple(ckpt.get("mean", fallback.mean))
    std = tuple(ckpt.get("std", fallback.std))
    method = args.method or str(ckpt.get("method", Path(args.checkpoint).stem))
    result = evaluate(
        model, x, y, mean=mean, std=std, cache_dir=args.cache, device=args.device,
        batch_size=args.batch_size, seed=args.seed, names=args.names,
        severities=args.severities, params=args.params, progress=args.progress,
        baseline=alexnet_baseline() if args.alexnet_baseline else None,
    )  # fmt: skip
    print(format_table({method: result}))
    if args.json:
        write_json(result, args.json)
        print(f"results -> {args.json}")
    if args.plot:
        if plot_error_vs_severity({method: result}, args.plot):
            print(f"plot -> {args.plot}")
        else:
            print("no plot: matplotlib is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
