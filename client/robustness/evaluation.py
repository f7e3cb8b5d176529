"""The robustness metrics the AugMix paper reports: clean error, corruption error (CIFAR-10-C
style mCE, optionally ImageNet-C's AlexNet-normalised mCE) and RMS calibration error.

    probs = predict(model, x, mean=MEAN, std=STD)                     # softmax, (N, C) float32
    result = evaluate(model, x, y, mean=MEAN, std=STD, cache_dir="cache/")
    print(format_table({"augmix": result}))

The command line (``python -m client.programs.evaluate``) is in :mod:`client.programs.evaluate`;
the metrics themselves in :mod:`client.robustness.metrics`.

The test set is an ``.npz`` (``x``, ``y``) or any dataset's test split (:func:`load_test_set`).

The corrupted test sets come from :func:`client.robustness.cache.iter_corrupted` (made once, then
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

import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from augserver.text import render_table
from client.robustness.cache import check_selection, iter_corrupted
from client.robustness.corruptions import corrupt_images, default_params
from client.robustness.metrics import classification_metrics
from client.robustness.tables import CORRUPTIONS, SEVERITIES

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
    cache_dir: str | os.PathLike | None,
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
    (and go to) ``cache_dir`` via :func:`client.robustness.cache.iter_corrupted`; with
    ``cache_dir`` None they are made ``batch_size`` images at a time and predicted at once,
    so no whole corrupted set is ever held (the same numbers: each image's draws depend on
    its index alone).
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
    run = {"mean": mean, "std": std, "batch_size": batch_size, "device": device}
    clean = classification_metrics(predict(model, images, **run), labels)
    corruptions: dict[str, dict[str, dict[str, float]]] = {}
    bar = _progress(len(names) * len(severities), progress)
    try:
        for name, severity, probs in _corrupted_predictions(
                model, images, run, cache_dir, seed, names, severities, params):
            corruptions.setdefault(name, {})[str(severity)] = classification_metrics(
                probs, labels)
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


def _corrupted_predictions(
    model: nn.Module, images: np.ndarray, run: dict[str, Any],
    cache_dir: str | os.PathLike | None, seed: int, names: tuple[str, ...],
    severities: tuple[int, ...], params: str | None,
) -> Iterator[tuple[str, int, np.ndarray]]:
    """``(name, severity, probabilities)`` of every corrupted set: whole cached sets, or
    without a cache chunk by chunk (one chunk of corrupted images in memory at a time)."""
    if cache_dir is not None:
        for name, severity, corrupted in iter_corrupted(
                images, cache_dir, seed=seed, names=names, severities=severities, params=params):
            yield name, severity, predict(model, corrupted, **run)
        return
    check_selection(names, severities)
    step = run["batch_size"]
    for name in names:
        for severity in severities:
            chunks = [predict(model, corrupt_images(images[k:k + step], name, severity, seed,
                                                    params, first_index=k), **run)
                      for k in range(0, len(images), step)]
            yield name, severity, np.concatenate(chunks)


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
    results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str | None = None
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
    ax.set_title(title or "Mean corruption error by severity")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("mean corruption error (%)")
    ax.set_ylim(bottom=0)
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
    source: str | os.PathLike, preprocess: str | None = None, limit: int | None = None,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a test set: ``x`` N x H x W x 3 uint8, ``y`` int64 labels.

    ``source`` is an ``.npz`` file holding ``x`` and ``y`` as they are (already at the model's
    resolution), or ``FORMAT:PATH`` of a dataset (``cifar10``/``cifar100``: the test batch;
    ``imagefolder``: ``PATH/val`` when PATH holds train/ and val/, else PATH; ``npz``) whose
    images go through the test-time view of ``preprocess`` (``cifar``: the centre 32 x 32;
    ``imagenet``: resize 256, centre crop 224; default: cifar for CIFAR, else imagenet), at
    ``image_size`` when given (the training job's; imagenet resizes in proportion, 342 for 299).
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
    record = preprocessing.get(preprocess) if preprocess else preprocessing.default_for(fmt)
    side = image_size or record.image_size
    dataset = open_dataset(fmt, path, train=False)
    keep = _subset(len(dataset), limit)
    indices = np.arange(len(dataset)) if keep is None else keep
    x = np.stack([dataset.sample(i, lambda s: record.eval(s, side)) for i in indices.tolist()])
    return x, dataset.labels(indices)


def _subset(n: int, limit: int | None) -> np.ndarray | None:
    """Sorted indices of a seeded random ``limit`` of ``n`` samples, or None for all."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))
