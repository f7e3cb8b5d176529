"""The ``augserver`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _demo(args: argparse.Namespace) -> int:
    """Run the AugMix kernel on real photos, print samples/s and save a preview grid."""
    from PIL import Image

    from augserver import transforms
    from augserver.augmix import AugMixConfig, augmix_triple, sample_rng

    try:
        import skimage.data
    except ImportError:
        print("augserver demo needs scikit-image (pip install 'augserver[test]')", file=sys.stderr)
        return 2
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    cases = [
        ("cifar", 3, [np.asarray(Image.fromarray(p).resize((32, 32))) for p in photos]),
        ("imagenet", 1, photos),
    ]
    rows = []
    for preprocess, severity, sources in cases:
        config = AugMixConfig(severity=severity)
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds or count < 2:
            rng = sample_rng(args.seed, 0, count)
            image = transforms.preprocess(preprocess, sources[count % len(sources)], rng)
            triple = augmix_triple(image, rng, config)
            count += 1
        elapsed = time.perf_counter() - start
        side = triple[0].shape[0]
        print(
            f"{preprocess:>8} {side}x{side} severity {severity}: "
            f"{count / elapsed:8.1f} triples/s on one core ({count} in {elapsed:.1f} s)"
        )
        rows.append(np.concatenate([np.asarray(Image.fromarray(v).resize((224, 224),
                    Image.NEAREST)) for v in triple], axis=1))
    if args.preview:
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.preview)
        print(f"preview (orig | aug1 | aug2) written to {args.preview}")
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (the clean way out of every long-running command)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def local_address(address: str) -> str:
    """Where local workers connect to a dispatcher bound at ``address`` (a wildcard host
    becomes the loopback)."""
    match = re.fullmatch(r"tcp://(\*|0\.0\.0\.0|\[::\]|\[\*\]):(\d+)", address)
    if match is None:
        return address
    host = "[::1]" if match[1] in ("[::]", "[*]") else "127.0.0.1"
    return f"tcp://{host}:{match[2]}"


def _serve(args: argparse.Namespace) -> int:
    """Run the dispatcher (and its local workers) until SIGINT or SIGTERM."""
    from augserver.config import ConfigError, load_config
    from augserver.datasets import DatasetError
    from augserver.dispatcher import Dispatcher
    from augserver.supervisor import Supervisor

    _setup_logging(args.log_level)
    try:
        config = load_config(args.config, {"bind": args.bind, "workers": args.workers})
        if config.workers and config.bind.startswith("inproc://"):
            raise ConfigError(f"{args.config}: bind: local workers cannot reach {config.bind}",
                              args.config, "bind")
        dispatcher = Dispatcher(config)
    except (ConfigError, DatasetError, OSError, ValueError) as exc:
        print(f"augserver serve: {exc}", file=sys.stderr)
        return 2
    stop = _stop_on_signals()
    supervisor = None
    try:
        if config.workers:
            supervisor = Supervisor(local_address(dispatcher.address), config.workers,
                                    args.log_level)
            supervisor.start()
        dispatcher.serve(stop, supervisor)
    finally:
        if supervisor is not None:
            supervisor.stop()
        dispatcher.close()
    return 0


def _worker(args: argparse.Namespace) -> int:
    """Run ``--procs`` workers against a dispatcher until SIGINT or SIGTERM."""
    from augserver.worker import EXIT_FATAL, run_worker

    _setup_logging(args.log_level)
    stop = _stop_on_signals()
    if args.procs == 1:
        return run_worker(args.connect, stop=stop)
    from augserver.supervisor import Supervisor

    supervisor = Supervisor(args.connect, args.procs, args.log_level)
    supervisor.start()
    try:
        while not stop.wait(0.2):
            supervisor.poll()
            if supervisor.finished:
                print("augserver worker: every worker stopped for good (see the log)",
                      file=sys.stderr)
                return EXIT_FATAL
    finally:
        supervisor.stop()
    return 0


def _status(args: argparse.Namespace) -> int:
    """Print a dispatcher's workers, clients, streams and counters."""
    from augserver.status import StatusError, format_status, request_status

    try:
        stats = request_status(args.connect, args.timeout)
    except StatusError as exc:
        print(f"augserver status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_status(stats))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_service_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the dispatcher (and local workers)")
    serve.add_argument("--config", required=True, help="job file (YAML)")
    serve.add_argument("--bind", help="address to bind, e.g. tcp://0.0.0.0:5555 (overrides "
                                      "the config's bind)")
    serve.add_argument("--workers", type=_non_negative_int,
                       help="local worker processes to start and supervise (overrides the "
                            "config's workers)")
    serve.set_defaults(run=_serve)
    worker = commands.add_parser("worker", help="run worker processes for a dispatcher")
    worker.add_argument("--connect", required=True, help="dispatcher address, tcp://HOST:PORT")
    worker.add_argument("--procs", type=_positive_int, default=1, help="worker processes")
    worker.set_defaults(run=_worker)
    status = commands.add_parser("status", help="show a dispatcher's workers and streams")
    status.add_argument("--connect", required=True, help="dispatcher address, tcp://HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    status.set_defaults(run=_status)
    for command in (serve, worker):
        command.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augserver", description="Distributed AugMix data loading over ZeroMQ."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the AugMix kernel on built-in photos")
    demo.add_argument("--seconds", type=float, default=2.0, help="time per image size")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--preview", default="augmix_demo.png", help="PNG to write ('' for none)")
    demo.set_defaults(run=_demo)
    _add_service_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``augserver`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
