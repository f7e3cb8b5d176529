"""The dispatcher's job configuration: one YAML file, defaults for everything but the dataset.

The full file, every key at its default (only ``dataset`` is required)::

    dataset:                  # required
      format: imagefolder     # cifar10 | cifar100 | imagefolder | npz | webdataset (required)
      path: /data/train       # required; relative paths are relative to this file's folder;
                              # webdataset: an index (DEST.index.json from `augserver shard`)
                              # or a brace pattern of .tar shards, local, http(s):// or s3://
      train: true             # CIFAR: train or test split; a folder holding train/ and val/:
                              # which of the two; ignored by npz and webdataset
      s3:                     # webdataset in an S3-compatible store (credentials: the AWS
        endpoint_url: null    # environment variables or profile); null: AWS_ENDPOINT_URL
        region: null          # null: AWS_REGION / the profile's region
    preprocess: imagenet      # cifar (crop 32, pad 4, flip) | imagenet (random resized crop
                              # 224, flip); default: cifar for cifar10/cifar100, else imagenet
    image_size: null          # side of the images served, 8..1024: null means the
                              # preprocessing's own (32 or 224); e.g. 64 with cifar for
                              # Tiny-ImageNet-like data, 128-192, 299 or 384 with imagenet
    augment: augmix           # augmix | none (plain preprocessing only: the "standard"
                              # baseline; one view per sample, needs jsd: false)
    augmix:
      severity: 1             # 1..10; default 3 with cifar preprocessing, 1 with imagenet
      width: 3                # chains mixed per view, >= 1
      depth: -1               # operations per chain, >= 1; -1 draws 1..3 per chain
      alpha: 1.0              # Dirichlet and Beta mixing parameter, > 0
      all_ops: false          # also color, contrast, brightness, sharpness (overlap ImageNet-C)
    jsd: true                 # true: (orig, aug1, aug2) per sample for the JSD loss;
                              # false: one view per sample; default false with augment: none
    batch_size: 128           # samples per batch, >= 1
    seed: 0                   # >= 0; the epoch order and every sample's draws derive from it
    drop_last: false          # drop a rank's last partial batch instead of padding it
    error_policy: skip        # a sample that cannot be read or decoded: skip (report, count,
                              # and put the next readable sample in its place, so batches keep
                              # their size) | fail (end the stream with the error)
    bind: tcp://127.0.0.1:5555  # the address the dispatcher binds (tcp://, ipc://, inproc://);
                              # one other hosts can reach needs security.curve (or .insecure)
    workers: 0                # local worker processes the dispatcher starts and supervises
    limits:
      max_message_bytes: 268435456   # largest incoming ZeroMQ message accepted (ZMQ_MAXMSGSIZE)
      heartbeat_interval: 1.0        # seconds between worker heartbeats, > 0
      heartbeat_misses: 3            # a worker silent this many intervals is declared dead
                                     # and its tasks are re-issued
      worker_slots: 2                # tasks a worker may hold at once, >= 1
      max_prefetch_bytes: 1073741824 # cap on what the dispatcher holds or has in flight for
                                     # one client, over all its streams, in bytes
      max_held_bytes: 4294967296     # cap on what the dispatcher holds or has in flight for
                                     # all peers together, in bytes
      max_streams_per_client: 16     # streams one client may have open at once
      max_unread_replies: 64         # replies a peer may leave unread; beyond, they are
                                     # dropped (logged): a peer that never reads cannot grow
                                     # the dispatcher
      io_threads: 0                  # ZeroMQ I/O threads of the dispatcher: each connection
                                     # (trainer, worker) is served by one; 0: one per 4 cores,
                                     # 1 to 4
      sample_seconds: 60.0           # a sample that takes longer to make is failed (reported
                                     # with its path, error_policy applies), never retried
      no_worker_seconds: 120.0       # a stream no worker could serve this long fails, saying
                                     # why (workers refused, or none joined)
      task_seconds: 300.0            # a task held longer than this, and 10x longer than the
                                     # median task, is re-issued (its late result dropped)
      max_image_pixels: 89478485     # larger images are refused before they are decoded
                                     # (decompression bombs; bounds a worker's memory)
    security:                 # CURVE encryption + authentication; turn on for traffic that
      curve: false            # leaves a host (off: plain TCP, fine on loopback)
      server_key: null        # the dispatcher's secret key file (NAME.key_secret from
                              # `augserver keys`); required with curve
      allow_dir: null         # folder of allowed worker/client public keys (*.key); required
                              # with curve; the dispatcher's own key is always allowed
      insecure: false         # true: serve other hosts without CURVE (a bind beyond loopback
                              # is refused otherwise); only on a network you trust
    metrics:
      bind: null              # HOST:PORT (e.g. 0.0.0.0:9100) to serve Prometheus metrics at
                              # http://HOST:PORT/metrics; null: no metrics endpoint

Every mistake raises :class:`ConfigError` naming the file and the dotted key, for example
``config.yaml: augmix.severity: must be in 1..10, got 12``. Types are strict: ``"64"`` is not
an integer, ``yes`` in quotes is not a boolean, and booleans are not integers.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, NoReturn

import yaml

from augserver import preprocessing
from augserver.addresses import check_endpoint, parse_host_port
from augserver.augmix_config import AugMixConfig
from augserver.batch import BatchLayout
from augserver.datasets import FORMATS
from augserver.errors import ConfigError
from augserver.storage import S3Options, is_remote

ERROR_POLICIES = ("skip", "fail")
AUGMENT = ("augmix", "none")
DEFAULT_BIND = "tcp://127.0.0.1:5555"
_MAX_INT = 2**63 - 1  # what msgpack and ZeroMQ's int64 options hold


@dataclass(frozen=True)
class DatasetConfig:
    """Where the samples are: ``format`` is one of :data:`augserver.datasets.FORMATS`."""

    format: str
    path: str
    train: bool = True
    s3: S3Options = field(default_factory=S3Options)
    """For ``webdataset`` shards in an S3-compatible store; None values defer to the
    environment (``AWS_ENDPOINT_URL``, ``AWS_REGION``)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits and failure detection of the dispatcher."""

    max_message_bytes: int = 256 * 2**20
    heartbeat_interval: float = 1.0
    heartbeat_misses: int = 3
    worker_slots: int = 2
    max_prefetch_bytes: int = 2**30
    max_held_bytes: int = 2**32
    max_streams_per_client: int = 16
    max_unread_replies: int = 64
    io_threads: int = 0
    sample_seconds: float = 60.0
    no_worker_seconds: float = 120.0
    task_seconds: float = 300.0
    max_image_pixels: int = 89_478_485

    @property
    def zmq_io_threads(self) -> int:
        """``io_threads``, or with 0 one per 4 cores of this host, 1 to 4."""
        return self.io_threads or max(1, min(4, (os.cpu_count() or 1) // 4))

    @property
    def heartbeat_timeout(self) -> float:
        """Seconds of silence after which a worker is declared dead."""
        return self.heartbeat_interval * self.heartbeat_misses


@dataclass(frozen=True)
class Security:
    """CURVE for the dispatcher: its secret key file and the allow-list folder (paths)."""

    curve: bool = False
    server_key: str | None = None
    allow_dir: str | None = None
    insecure: bool = False
    """Serve peers from other hosts without CURVE: an explicit opt-out, logged as a warning."""


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: ``bind`` is ``HOST:PORT``, or None for none."""

    bind: str | None = None


@dataclass(frozen=True)
class JobConfig:
    """A validated job: build it with :func:`load_config` or :func:`config_from_dict`."""

    dataset: DatasetConfig
    preprocess: str
    augmix: AugMixConfig
    image_size: int = 0
    """Side of the square images served; 0 (the default) becomes the preprocessing's own."""
    augment: str = "augmix"
    jsd: bool = True
    batch_size: int = 128
    seed: int = 0
    drop_last: bool = False
    error_policy: str = "skip"
    bind: str = DEFAULT_BIND
    workers: int = 0
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def views(self) -> int:
        """Image views per sample: 3 (orig, aug1, aug2) with jsd, else 1 (one AugMix view, or
        the plain preprocessed image with ``augment: none``)."""
        return 3 if self.jsd else 1

    @property
    def preprocessing(self) -> preprocessing.Preprocessing:
        """The record of this job's preprocessing (size, mean/std, train and eval views)."""
        return preprocessing.get(self.preprocess)

    def __post_init__(self) -> None:
        if not self.image_size:
            object.__setattr__(self, "image_size", self.preprocessing.image_size)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel (RGB) normalisation mean, on pixels scaled to [0, 1]."""
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel (RGB) normalisation standard deviation, on pixels scaled to [0, 1]."""
        return self.preprocessing.std

    @property
    def layout(self) -> BatchLayout:
        """How this job's batches are laid out (see :mod:`augserver.batch`)."""
        return BatchLayout(self.views, self.image_size)

    @property
    def batch_bytes(self) -> int:
        """Bytes of uint8 pixels in one full batch (all views)."""
        return self.batch_size * self.views * self.image_size**2 * 3

    def to_dict(self) -> dict[str, Any]:
        """Plain (msgpack/JSON-safe) form; ``config_from_dict(c.to_dict()) == c``."""
        return asdict(self)


_SECTIONS = {
    "dataset": tuple(f.name for f in fields(DatasetConfig)),
    "dataset.s3": tuple(f.name for f in fields(S3Options)),
    "augmix": tuple(f.name for f in fields(AugMixConfig)),
    "limits": tuple(f.name for f in fields(Limits)),
    "security": tuple(f.name for f in fields(Security)),
    "metrics": tuple(f.name for f in fields(MetricsConfig)),
}
_TOP_KEYS = tuple(f.name for f in fields(JobConfig))
KEYS = _TOP_KEYS + tuple(f"{s}.{k}" for s, names in _SECTIONS.items() for k in names)
_DEFAULTS: dict[str, Any] = {
    **{f.name: f.default for f in fields(JobConfig) if f.default is not MISSING},
    **{f"limits.{f.name}": f.default for f in fields(Limits)},
    **{f"security.{f.name}": f.default for f in fields(Security)},
    "dataset.train": True,
    "metrics.bind": None,
}


def _unknown_key(source: str, dotted: str, what: str = "key") -> ConfigError:
    """The error for ``dotted``, suggesting the same name in another section, else a near one."""
    section, _, name = dotted.rpartition(".")
    by_name = {key.rpartition(".")[2]: key for key in KEYS}  # names are unique across sections
    siblings = {k.rpartition(".")[2]: k for k in KEYS if k.rpartition(".")[0] == section}
    siblings = siblings or {k: k for k in _TOP_KEYS}
    if name in by_name:
        hint = f" (did you mean {by_name[name]!r}?)"
    elif near := difflib.get_close_matches(name, siblings, n=1):
        hint = f" (did you mean {siblings[near[0]]!r}?)"
    elif near := difflib.get_close_matches(name, by_name, n=1):
        hint = f" (did you mean {by_name[near[0]]!r}?)"
    else:
        hint = f"; valid keys here: {', '.join(siblings)}"
    return ConfigError(f"{source}: unknown {what} {dotted!r}{hint}", source, dotted)


class _Reader:
    """Reads and checks one config mapping, raising ConfigError that names ``source``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {key}: {problem}", self.source, key)

    def section(self, data: Any, name: str) -> dict[str, Any]:
        """The mapping under ``name`` (empty when absent or null), with its keys checked."""
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            self.fail(name, f"must be a mapping of {', '.join(_SECTIONS[name])}, got {data!r}")
        for key in data:
            if key not in _SECTIONS[name]:
                raise _unknown_key(self.source, f"{name}.{key}")
        return dict(data)

    def integer(self, data: Mapping[str, Any], key: str, low: int) -> int:
        value = data.get(key.rpartition(".")[2], _DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_INT:
            self.fail(key, f"must be an integer >= {low}, got {value!r}")
        return value

    def number(self, data: Mapping[str, Any], key: str) -> float:
        value = data.get(key.rpartition(".")[2], _DEFAULTS[key])
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            self.fail(key, f"must be a number > 0, got {value!r}")
        return float(value)

    def flag(self, data: Mapping[str, Any], key: str) -> bool:
        value = data.get(key.rpartition(".")[2], _DEFAULTS[key])
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def choice(self, data: Mapping[str, Any], key: str, valid: Any, default: Any = None) -> str:
        default = _DEFAULTS.get(key, default)
        value = data.get(key.rpartition(".")[2], default)
        if value is None and default is None:
            self.fail(key, f"missing (required): one of {', '.join(valid)}")
        if value not in valid:
            self.fail(key, f"must be one of {', '.join(valid)}, got {value!r}")
        return value


def _dataset(r: _Reader, data: Any, check_paths: bool, base_dir: str | None) -> DatasetConfig:
    if data is None:
        r.fail("dataset", "missing (required), e.g. dataset: {format: imagefolder, path: /data}")
    data = r.section(data, "dataset")
    fmt = r.choice(data, "dataset.format", FORMATS)
    path = data.get("path")
    if path is None:
        r.fail("dataset.path", "missing (required)")
    if not isinstance(path, str) or not path:
        r.fail("dataset.path", f"must be a non-empty string, got {path!r}")
    s3 = _s3(r, data.get("s3"))
    if fmt == "webdataset" and is_remote(path):
        return DatasetConfig(fmt, path, r.flag(data, "dataset.train"), s3)
    path = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    if check_paths and fmt == "webdataset":
        where = path if path.endswith(".json") else os.path.dirname(path) or "."
        if not os.path.exists(where):
            r.fail("dataset.path", f"{where} does not exist")
    elif check_paths:
        if not os.path.exists(path):
            r.fail("dataset.path", f"{path} does not exist")
        if fmt == "npz" and not os.path.isfile(path):
            r.fail("dataset.path", f"{path} is not a file (format npz)")
        if fmt != "npz" and not os.path.isdir(path):
            r.fail("dataset.path", f"{path} is not a directory (format {fmt})")
    return DatasetConfig(fmt, path, r.flag(data, "dataset.train"), s3)


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024


def _image_size(r: _Reader, value: Any, preprocess: str) -> int:
    if value is None:
        return preprocessing.get(preprocess).image_size
    if isinstance(value, bool) or not isinstance(value, int) or not (
            MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE):
        r.fail("image_size", f"must be an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} or "
                             f"null, got {value!r}")
    return value


def _s3(r: _Reader, data: Any) -> S3Options:
    section = r.section(data, "dataset.s3")
    values = {}
    for name in _SECTIONS["dataset.s3"]:
        value = section.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            r.fail(f"dataset.s3.{name}", f"must be a non-empty string or null, got {value!r}")
        values[name] = value
    return S3Options(**values)


def _key_path(r: _Reader, data: Mapping[str, Any], key: str, check_paths: bool,
              base_dir: str | None, want_dir: bool) -> str | None:
    """An optional path (relative to ``base_dir``); it must exist when ``check_paths``."""
    path = data.get(key.rpartition(".")[2])
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        r.fail(key, f"must be a non-empty string (a path), got {path!r}")
    path = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base_dir, path))
    if check_paths and not (os.path.isdir(path) if want_dir else os.path.isfile(path)):
        r.fail(key, f"{path} is not {'a directory' if want_dir else 'a file'}")
    return path


def _security(r: _Reader, data: Any, check_paths: bool, base_dir: str | None) -> Security:
    data = r.section(data, "security")
    curve = r.flag(data, "security.curve")
    server_key = _key_path(r, data, "security.server_key", check_paths, base_dir, False)
    allow_dir = _key_path(r, data, "security.allow_dir", check_paths, base_dir, True)
    if curve and server_key is None:
        r.fail("security.server_key", "required with curve: true (the dispatcher's secret "
               "key file, NAME.key_secret from `augserver keys`)")
    if curve and allow_dir is None:
        r.fail("security.allow_dir", "required with curve: true (a directory of allowed "
               "worker and client public keys)")
    return Security(curve, server_key, allow_dir, r.flag(data, "security.insecure"))


def _metrics(r: _Reader, data: Any) -> MetricsConfig:
    bind = r.section(data, "metrics").get("bind")
    if bind is not None:
        try:
            parse_host_port(bind)
        except ValueError as exc:
            r.fail("metrics.bind", f"{exc}, or null")
    return MetricsConfig(bind)


def _augmix(r: _Reader, data: Any, preprocess: str) -> AugMixConfig:
    params = r.section(data, "augmix")
    params.setdefault("severity", preprocessing.get(preprocess).default_severity)
    alpha = params.get("alpha")
    if isinstance(alpha, int | float) and not isinstance(alpha, bool):
        if not math.isfinite(alpha):
            r.fail("augmix.alpha", f"must be a finite number > 0, got {alpha!r}")
        params["alpha"] = float(alpha)
    try:
        return AugMixConfig(**params)
    except ConfigError as exc:  # its message starts with its key
        raise ConfigError(f"{r.source}: {exc}", r.source, exc.key) from None


def config_from_dict(
    data: Mapping[str, Any] | None,
    source: str = "<config>",
    check_paths: bool = True,
    *,
    base_dir: str | None = None,
) -> JobConfig:
    """Validate ``data`` (the parsed YAML, or :meth:`JobConfig.to_dict`) into a JobConfig.

    ``source`` names the origin in error messages. A relative ``dataset.path`` is joined to
    ``base_dir`` when given, else kept as is. ``check_paths`` requires the path to exist here.
    """
    r = _Reader(source)
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else f"{type(data).__name__} {data!r:.60}"
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys (dataset: ..., augmix: ...), "
            f"got {got}",
            source,
        )
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown_key(source, str(key))
    dataset = _dataset(r, data.get("dataset"), check_paths, base_dir)
    default_pre = preprocessing.default_for(dataset.format).name
    preprocess = r.choice(data, "preprocess", preprocessing.NAMES, default_pre)
    limits = r.section(data.get("limits"), "limits")
    bind = data.get("bind", _DEFAULTS["bind"])
    try:
        check_endpoint(bind, bind=True)
    except ValueError as exc:
        r.fail("bind", str(exc))
    augment = r.choice(data, "augment", AUGMENT)
    jsd = r.flag(data, "jsd") if augment == "augmix" or "jsd" in data else False
    if jsd and augment == "none":
        r.fail("jsd", "must be false with augment: none (no AugMix views to compare)")
    return JobConfig(
        dataset=dataset,
        preprocess=preprocess,
        augmix=_augmix(r, data.get("augmix"), preprocess),
        image_size=_image_size(r, data.get("image_size"), preprocess),
        augment=augment,
        jsd=jsd,
        batch_size=r.integer(data, "batch_size", 1),
        seed=r.integer(data, "seed", 0),
        drop_last=r.flag(data, "drop_last"),
        error_policy=r.choice(data, "error_policy", ERROR_POLICIES),
        bind=bind,
        workers=r.integer(data, "workers", 0),
        limits=Limits(
            max_message_bytes=r.integer(limits, "limits.max_message_bytes", 1),
            heartbeat_interval=r.number(limits, "limits.heartbeat_interval"),
            heartbeat_misses=r.integer(limits, "limits.heartbeat_misses", 1),
            worker_slots=r.integer(limits, "limits.worker_slots", 1),
            max_prefetch_bytes=r.integer(limits, "limits.max_prefetch_bytes", 1),
            max_held_bytes=r.integer(limits, "limits.max_held_bytes", 1),
            max_streams_per_client=r.integer(limits, "limits.max_streams_per_client", 1),
            max_unread_replies=r.integer(limits, "limits.max_unread_replies", 1),
            io_threads=r.integer(limits, "limits.io_threads", 0),
            sample_seconds=r.number(limits, "limits.sample_seconds"),
            no_worker_seconds=r.number(limits, "limits.no_worker_seconds"),
            task_seconds=r.number(limits, "limits.task_seconds"),
            max_image_pixels=r.integer(limits, "limits.max_image_pixels", 1),
        ),
        security=_security(r, data.get("security"), check_paths, base_dir),
        metrics=_metrics(r, data.get("metrics")),
    )


def _apply_overrides(source: str, data: Any, overrides: Mapping[str, Any]) -> Any:
    """``data`` with dotted-key ``overrides`` applied (a copy; None values are ignored)."""
    if not isinstance(data, Mapping):
        return data  # config_from_dict reports it
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for dotted, value in overrides.items():
        if dotted not in KEYS:
            raise _unknown_key(source, str(dotted), "override key")
        if value is None:
            continue
        name, _, sub = dotted.partition(".")
        if not sub:
            merged[name] = value
        elif merged.get(name) is None:
            merged[name] = {sub: value}
        elif isinstance(merged[name], dict):
            merged[name][sub] = value
        # else: the file's section is not a mapping; config_from_dict reports it.
    return merged


def load_config(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | None = None,
    check_paths: bool = True,
) -> JobConfig:
    """Load and validate the YAML job file at ``path``.

    ``overrides`` maps dotted keys (``"workers"``, ``"augmix.severity"``) to values that take
    precedence over the file; None values are ignored (an unset command-line flag). A relative
    ``dataset.path`` is resolved against the file's folder (against the current directory when
    it comes from an override). ``check_paths=False`` skips the check that it exists here.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}", source) from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}", source) from exc
    overrides = dict(overrides or {})
    base_dir = os.path.dirname(os.path.abspath(source))
    if any(overrides.get(k) is not None for k in ("dataset", "dataset.path")):
        base_dir = os.getcwd()
    for key in ("security.server_key", "security.allow_dir"):  # flags: relative to here
        if isinstance(overrides.get(key), str | os.PathLike):
            overrides[key] = os.path.abspath(os.path.expanduser(overrides[key]))
    data = _apply_overrides(source, data, overrides)
    try:
        return config_from_dict(data, source, check_paths, base_dir=base_dir)
    except ConfigError as exc:
        key = exc.key or ""
        overridden = [k for k, v in overrides.items() if v is not None]
        if any(key == k or key.startswith(f"{k}.") for k in overridden):
            message = str(exc).replace(f"{source}: {key}:", f"{source}: {key} (override):", 1)
            raise ConfigError(message, source, key) from None
        raise
