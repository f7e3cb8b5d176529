"""Kernel benchmark: AugMix training samples per second on one core.

One sample is the full JSD triple (orig, aug1, aug2) of one source photo, preprocessing crop
included. augserver's kernel (``augserver.transforms`` + ``augserver.augmix``, exact mode)
runs side by side, in the same process and interleaved, with the usual way users write it:
a per-image PIL AugMix that follows the authors' reference structure (torchvision-style
crop on PIL images, the reference PIL ops, ToTensor + Normalize per chain, float mix in
torch). Both run single-threaded. It prints samples/s for each and the ratio.

    python bench/kernel.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from augserver import op_names, ops, preprocessing  # noqa: E402
from augserver.augmix import AugMixConfig, augmix_triple, sample_rng  # noqa: E402
from augserver.reference import PIL_OPS  # noqa: E402

CIFAR_MEAN = CIFAR_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def photos() -> list[np.ndarray]:
    """Real photos that scikit-image ships (no download)."""
    return [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]


# ---------------------------------------------------------------- the usual way (comparator)


class UsualAugMix:
    """Per-image PIL AugMix as in the reference ``AugMixDataset`` (torch preprocessing)."""

    def __init__(self, preprocess: str, severity: int) -> None:
        self.crop = self._cifar_crop if preprocess == "cifar" else self._imagenet_crop
        mean, std = (CIFAR_MEAN, CIFAR_STD) if preprocess == "cifar" else (
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.severity = severity

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """torchvision ToTensor() then Normalize(mean, std)."""
        t = torch.from_numpy(np.array(img, np.uint8, copy=True))
        t = t.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return t.sub(self.mean).div(self.std)

    def aug(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """The reference ``aug``: Dirichlet/Beta mix of width-3 chains of PIL ops."""
        ws = np.float32(rng.dirichlet([1.0] * 3))
        m = np.float32(rng.beta(1.0, 1.0))
        mix = torch.zeros_like(self.preprocess(img))
        for i in range(3):
            image_aug = img.copy()
            for _ in range(rng.integers(1, 4)):
                name = op_names.OPS[rng.integers(len(op_names.OPS))]
                value = ops.sample(name, rng, self.severity, image_aug.size)
                image_aug = PIL_OPS[name](image_aug, value)
            mix += ws[i] * self.preprocess(image_aug)
        return (1 - m) * self.preprocess(img) + m * mix

    def __call__(self, source: Image.Image, rng: np.random.Generator) -> tuple:
        x = self.crop(source, rng)
        return self.preprocess(x), self.aug(x, rng), self.aug(x, rng)

    @staticmethod
    def _cifar_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip on a PIL image."""
        padded = ImageOps.expand(img, border=4, fill=0)
        top, left = rng.integers(0, padded.height - 32 + 1), rng.integers(0, padded.width - 32 + 1)
        out = padded.crop((left, top, left + 32, top + 32))
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out

    @staticmethod
    def _imagenet_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision RandomResizedCrop(224) + RandomHorizontalFlip on a PIL image."""
        width, height = img.size
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        box = (0, 0, width, height)
        for _ in range(10):
            target = area * rng.uniform(0.08, 1.0)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                box = (left, top, left + w, top + h)
                break
        out = img.crop(box).resize((224, 224), Image.BILINEAR)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


# ---------------------------------------------------------------- augserver


def augserver_sample(preprocess: str, config: AugMixConfig) -> Callable:
    def run(source: np.ndarray, index: int) -> tuple:
        rng = sample_rng(0, 0, index)
        return augmix_triple(preprocessing.preprocess(preprocess, source, rng), rng, config)

    return run


def usual_sample(preprocess: str, severity: int) -> Callable:
    usual = UsualAugMix(preprocess, severity)

    def run(source: Image.Image, index: int) -> tuple:
        return usual(source, np.random.default_rng(index))

    return run


def rate(fn: Callable, sources: list, seconds: float) -> float:
    """Samples per second of ``fn`` over ``sources`` for about ``seconds``."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        fn(sources[count % len(sources)], count)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    raw = photos()
    cifar = [np.asarray(Image.fromarray(p).resize((32, 32), Image.BILINEAR)) for p in raw]
    cases = [
        ("32x32 sev 3", "cifar", 3, cifar),
        ("224x224 sev 1", "imagenet", 1, raw),
        ("224x224 sev 3", "imagenet", 3, raw),
    ]
    print(f"{'case':<16}{'augserver/s':>14}{'usual PIL/s':>14}{'ratio':>8}")
    for label, preprocess, severity, sources in cases:
        ours = augserver_sample(preprocess, AugMixConfig(severity=severity))
        usual = usual_sample(preprocess, severity)
        pil_sources = [Image.fromarray(s) for s in sources]
        ours(sources[0], 0)  # compile / warm caches outside the timing
        usual(pil_sources[0], 0)
        best_ours = best_usual = 0.0
        for _ in range(args.rounds):
            best_ours = max(best_ours, rate(ours, sources, args.seconds))
            best_usual = max(best_usual, rate(usual, pil_sources, args.seconds))
        print(f"{label:<16}{best_ours:>14.1f}{best_usual:>14.1f}{best_ours / best_usual:>7.1f}x")


if __name__ == "__main__":
    main()
