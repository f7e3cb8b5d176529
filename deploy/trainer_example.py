"""An example trainer for a running augserver dispatcher: a small CNN trained with the AugMix
JSD loss on whatever job the dispatcher serves (deploy/augserver.yaml: ImageNet-style 224x224).

    python deploy/trainer_example.py --connect tcp://DISPATCHER:5555 [--steps 100]
        [--classes 1000] [--device cuda]

It only shows the wiring (RemoteAugMixLoader -> model -> jsd_loss, the same loop as the README
demo, ``client.demo.train``); bring your own model.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from client import RemoteAugMixLoader
from client.demo import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connect", default="tcp://augserver:5555", help="dispatcher address")
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model = nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=4, padding=3), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, args.classes),
    ).to(args.device)  # fmt: skip
    loader = RemoteAugMixLoader(args.connect, device=args.device)
    train(loader, model, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
