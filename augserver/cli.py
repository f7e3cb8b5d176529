"""The ``augserver`` command line."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from augserver.config import JobConfig
    from augserver.dispatcher import Dispatcher
    from augserver.metrics import MetricsServer
    from augserver.security import ClientKeys

from augserver.addresses import connect_address

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _kernel(args: argparse.Namespace) -> int:
    """Time the AugMix kernel on real photos (triples/s on one core), save a preview grid."""
    from PIL import Image

    from augserver import preprocessing
    from augserver.augmix import AugMixConfig, augmix_triple, sample_rng

    try:
        import skimage.data
    except ImportError:
        print("augserver kernel needs scikit-image (pip install 'augserver[test]')",
              file=sys.stderr)
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
            image = preprocessing.preprocess(preprocess, sources[count % len(sources)], rng)
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


def _enable_faulthandler() -> None:
    """A crash (SIGSEGV, SIGBUS...) prints every thread's Python stack on stderr, where a
    supervisor finds it; nothing when stderr is no real file (an embedding host)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        faulthandler.enable()


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (the clean way out of every long-running command)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _serve(args: argparse.Namespace) -> int:
    """Run the dispatcher (and its local workers) until SIGINT or SIGTERM."""
    from augserver.addresses import local_address
    from augserver.config import ConfigError, load_config
    from augserver.datasets import DatasetError
    from augserver.dispatcher import Dispatcher
    from augserver.supervisor import Supervisor

    _setup_logging(args.log_level)
    _enable_faulthandler()
    try:
        config = load_config(args.config, {"bind": args.bind, "workers": args.workers,
                                           "metrics.bind": args.metrics,
                                           **_security_overrides(args)})
        if config.workers and config.bind.startswith("inproc://"):
            raise ConfigError(f"{args.config}: bind: local workers cannot reach {config.bind}",
                              args.config, "bind")
        dispatcher = Dispatcher(config)
    except (ConfigError, DatasetError, OSError, ValueError) as exc:
        print(f"augserver serve: {exc}", file=sys.stderr)
        return 2
    try:
        metrics = _metrics_server(dispatcher, config.metrics.bind)
    except OSError as exc:
        print(f"augserver serve: {exc}", file=sys.stderr)
        dispatcher.close()
        return 2
    stop = _stop_on_signals()
    supervisor = None
    try:
        if config.workers and not _load_kernels_for_workers("serve"):
            return 2
        if config.workers:
            supervisor = Supervisor(local_address(dispatcher.address), config.workers,
                                    args.log_level, _local_worker_keys(config))
            supervisor.start()
        dispatcher.serve(stop, supervisor)
    finally:
        if supervisor is not None:
            supervisor.stop()
        if metrics is not None:
            metrics.close()
        dispatcher.close()
    return 0


def _metrics_server(dispatcher: Dispatcher, bind: str | None) -> MetricsServer | None:
    """The started Prometheus endpoint of ``dispatcher`` at ``bind`` (HOST:PORT), or None."""
    if bind is None:
        return None
    from augserver.addresses import is_local
    from augserver.metrics import MetricsServer

    server = MetricsServer(bind, dispatcher.start_snapshots()).start()
    host, port = server.address[:2]
    metrics_log = logging.getLogger("augserver.metrics")
    metrics_log.info("metrics on http://%s:%d/metrics", host, port)
    if not is_local(f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"):
        metrics_log.warning(
            "SECURITY: the metrics at http://%s:%d/metrics are readable by any host that "
            "reaches the port, without authentication (dataset paths, worker and client "
            "names); bind 127.0.0.1 unless a scraper on another host needs them", host, port)
    return server


def _security_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``serve --curve-key/--allow`` as config overrides (either one turns CURVE on)."""
    on = args.curve_key is not None or args.allow is not None
    return {"security.curve": True if on else None, "security.server_key": args.curve_key,
            "security.allow_dir": args.allow}


def _local_worker_keys(config: JobConfig) -> list[str]:
    """Local workers' CURVE flags: the dispatcher's own key pair (always allowed); its secret
    file also holds the public key, so it serves as ``--server-key`` too."""
    key = config.security.server_key
    if not config.security.curve or key is None:
        return []
    return ["--key", key, "--server-key", key]


def _client_keys(args: argparse.Namespace, command: str) -> ClientKeys | None:
    """``--key``/``--server-key`` loaded; exits with status 2 on a bad or half-given pair."""
    from augserver.security import ClientKeys

    try:
        return ClientKeys.load(args.key, args.server_key)
    except ValueError as exc:
        print(f"augserver {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _load_kernels_for_workers(command: str) -> bool:
    """Make sure numba's cache holds the kernels before starting worker processes: the first run
    after an install compiles them here, once, and the workers then load them from the cache
    instead of each compiling them on the same cores. False (reported) when that fails."""
    from augserver.kernels_cache import cache_dir, is_warm, load_kernels

    log = logging.getLogger("augserver.kernels")
    try:
        if is_warm():
            log.info("AugMix kernels cached in %s; the workers load them from there", cache_dir())
            return True
        log.info("compiling the AugMix kernels once, before starting the workers (the first run "
                 "after an install; about 10 s)")
        result = load_kernels()
    except RuntimeError as exc:
        print(f"augserver {command}: {exc}", file=sys.stderr)
        return False
    log.log(logging.WARNING if result.problems else logging.INFO, "%s", result.describe())
    return True


def _warm_up(args: argparse.Namespace) -> int:
    """Compile the kernels into numba's cache (or check they are there) and say where."""
    from augserver.kernels_cache import load_kernels

    try:
        result = load_kernels()
    except RuntimeError as exc:
        print(f"augserver warm-up: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    return 1 if result.problems or result.cache_dir is None else 0


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def byte_size(text: str) -> int:
    """``256MB``, ``1GiB``, ``4096``: a size in bytes (decimal and binary units)."""
    match = _SIZE.fullmatch(text.strip())
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()]) if match else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of at least one byte "
                                         "(like 256MB or 1GiB)")
    return size


def _shard(args: argparse.Namespace) -> int:
    """Turn a dataset into WebDataset shards plus their index, locally or in S3."""
    from augserver.datasets import FORMATS, open_dataset
    from augserver.errors import AugserverError
    from augserver.shards import write_shards
    from augserver.storage import S3Options, open_store

    fmt, sep, path = args.source.partition(":")
    if not sep or fmt not in FORMATS or not path:
        print(f"augserver shard: the source is FORMAT:PATH with FORMAT one of "
              f"{', '.join(FORMATS)}, got {args.source!r}", file=sys.stderr)
        return 2
    s3 = S3Options(args.endpoint_url, args.region)
    try:
        dataset = open_dataset(fmt, path, not args.val, s3)
        start = time.monotonic()
        index = write_shards(
            dataset, open_store(args.dest, s3), args.dest, args.shard_size,
            lambda done: print(f"  {done} of {len(dataset)} samples", file=sys.stderr))
    except (AugserverError, OSError, ValueError) as exc:
        print(f"augserver shard: {exc}", file=sys.stderr)
        return 1
    total = sum(s.size for s in index.shards)
    print(f"{len(index)} samples in {len(index.shards)} shards ({total / 1e6:.1f} MB) in "
          f"{time.monotonic() - start:.1f} s; index: {args.dest}.index.json")
    return 0


def _keys(args: argparse.Namespace) -> int:
    """Generate a CURVE key pair and say where each file goes."""
    from augserver.security import create_keys

    try:
        public, secret = create_keys(args.out, args.name)
    except OSError as exc:  # FileExistsError included: never overwrite a key
        print(f"augserver keys: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret}  (keep it private, mode 0600)\n"
          "For the dispatcher: serve --curve-key SECRET --allow DIR; its public key goes to "
          "every worker and client (--server-key / server_key=).\n"
          "For a worker or client: --key SECRET (curve_key=); copy its public key into the "
          "dispatcher's allow-list DIR.")
    return 0


def _worker(args: argparse.Namespace) -> int:
    """Run ``--procs`` workers against a dispatcher until SIGINT or SIGTERM."""
    from augserver.worker import EXIT_FATAL, run_worker

    _setup_logging(args.log_level)
    _enable_faulthandler()
    keys = _client_keys(args, "worker")
    stop = _stop_on_signals()
    if args.procs == 1:
        return run_worker(args.connect, stop=stop, keys=keys)
    from augserver.supervisor import Supervisor

    if not _load_kernels_for_workers("worker"):
        return 2
    extra = ["--key", args.key, "--server-key", args.server_key] if keys else []
    supervisor = Supervisor(args.connect, args.procs, args.log_level, extra)
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
        stats = request_status(args.connect, args.timeout, _client_keys(args, "status"))
    except StatusError as exc:
        print(f"augserver status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats.to_dict(), indent=2, sort_keys=True) if args.json
          else format_status(stats))
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
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
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (overrides "
                            "the config's metrics.bind)")
    serve.add_argument("--workers", type=_non_negative_int,
                       help="local worker processes to start and supervise (overrides the "
                            "config's workers)")
    serve.add_argument("--curve-key", metavar="SECRETFILE",
                       help="turn CURVE on with this dispatcher secret key (NAME.key_secret; "
                            "sets security.curve and security.server_key)")
    serve.add_argument("--allow", metavar="DIR",
                       help="CURVE allow-list: a directory of worker/client public keys "
                            "(sets security.allow_dir)")
    serve.set_defaults(run=_serve)
    worker = commands.add_parser("worker", help="run worker processes for a dispatcher")
    worker.add_argument("--connect", required=True, type=connect_address,
                        help="dispatcher address, tcp://HOST:PORT")
    worker.add_argument("--procs", type=positive_int, default=1, help="worker processes")
    worker.set_defaults(run=_worker)
    keys = commands.add_parser("keys", help="generate a CURVE key pair")
    keys.add_argument("--out", required=True, help="directory to write the key files to")
    keys.add_argument("--name", default="augserver",
                      help="file name stem: NAME.key (public), NAME.key_secret (secret)")
    keys.set_defaults(run=_keys)
    status = commands.add_parser("status", help="show a dispatcher's workers and streams")
    status.add_argument("--connect", required=True, type=connect_address,
                        help="dispatcher address, tcp://HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    status.set_defaults(run=_status)
    for command in (worker, status):
        command.add_argument("--key", metavar="SECRETFILE",
                             help="CURVE: this side's secret key file (NAME.key_secret)")
        command.add_argument("--server-key", metavar="PUBLICFILE",
                             help="CURVE: the dispatcher's public key file (NAME.key)")
    for command in (serve, worker):
        command.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augserver", description="Distributed AugMix data loading over ZeroMQ."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    kernel = commands.add_parser(
        "kernel", help="time the AugMix kernel on built-in photos and write a preview grid")
    kernel.add_argument("--seconds", type=float, default=2.0, help="time per image size")
    kernel.add_argument("--seed", type=int, default=0)
    kernel.add_argument("--preview", default="augmix_preview.png",
                        help="PNG to write ('' for none)")
    kernel.set_defaults(run=_kernel)
    warm = commands.add_parser(
        "warm-up", help="compile the AugMix kernels into numba's cache ahead of the first run")
    warm.set_defaults(run=_warm_up)
    shard = commands.add_parser(
        "shard", help="write a dataset as WebDataset tar shards and their index (local or s3)")
    shard.add_argument("source", help="FORMAT:PATH, e.g. imagefolder:/data/train")
    shard.add_argument("dest", help="a path prefix or s3://BUCKET/PREFIX: writes "
                                    "DEST-000000.tar, ... and DEST.index.json")
    shard.add_argument("--shard-size", type=byte_size, default=256 * 10**6,
                       help="bytes per shard, about (default 256MB)")
    shard.add_argument("--val", action="store_true",
                       help="the validation split (CIFAR test, an image folder's val/)")
    shard.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    shard.add_argument("--region", default=None, help="S3 region (default: AWS_REGION)")
    shard.set_defaults(run=_shard)
    _add_service_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``augserver`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
