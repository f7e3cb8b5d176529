"""augserver.config: the dispatcher's YAML job file, its defaults, overrides and errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

from augserver import datasets, transforms
from augserver.augmix import AugMixConfig
from augserver.config import (
    KEYS,
    ConfigError,
    DatasetConfig,
    JobConfig,
    Limits,
    config_from_dict,
    load_config,
)
from augserver.storage import S3Options

pytestmark = pytest.mark.unit

FULL = {
    "dataset": {"format": "npz", "path": "train.npz", "train": False,
                "s3": {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1"}},
    "preprocess": "cifar",
    "augmix": {"severity": 5, "width": 4, "depth": 2, "alpha": 0.5, "all_ops": True},
    "augment": "none",
    "jsd": False,
    "image_size": 40,
    "batch_size": 32,
    "seed": 7,
    "drop_last": True,
    "error_policy": "fail",
    "bind": "tcp://127.0.0.1:6000",
    "workers": 4,
    "limits": {
        "max_message_bytes": 1 << 20,
        "heartbeat_interval": 0.25,
        "heartbeat_misses": 5,
        "worker_slots": 1,
        "max_prefetch_bytes": 1 << 24,
        "max_held_bytes": 1 << 26,
        "max_streams_per_client": 3,
        "max_unread_replies": 9,
        "io_threads": 3,
        "sample_seconds": 5.5,
        "no_worker_seconds": 7.5,
        "task_seconds": 9.5,
        "max_image_pixels": 4096,
    },
    "security": {"curve": False, "server_key": None, "allow_dir": None, "insecure": True},
    "metrics": {"bind": "127.0.0.1:9100"},
}


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    """``data`` as a YAML file (a str is written verbatim), with the dataset paths it names."""
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "train.npz").touch()
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error(tmp_path: Path, data: Any, overrides: dict[str, Any] | None = None) -> str:
    """The ConfigError message of loading ``data``; it must name the file."""
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert info.value.source == str(path)
    return message


def minimal(**extra: Any) -> dict[str, Any]:
    return {"dataset": {"format": "imagefolder", "path": "data"}, **extra}


# ---------------------------------------------------------------------------- defaults


def test_minimal_imagefolder_file_gets_imagenet_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()))
    assert config == JobConfig(
        dataset=DatasetConfig("imagefolder", str(tmp_path / "data"), True),
        preprocess="imagenet",
        augmix=AugMixConfig(severity=1, width=3, depth=-1, alpha=1.0, all_ops=False),
        jsd=True,
        batch_size=128,
        seed=0,
        drop_last=False,
        error_policy="skip",
        bind="tcp://127.0.0.1:5555",  # loopback unless the job says otherwise
        workers=0,
        limits=Limits(
            max_message_bytes=268435456,
            heartbeat_interval=1.0,
            heartbeat_misses=3,
            worker_slots=2,
            max_prefetch_bytes=1073741824,
        ),
    )
    assert (config.views, config.image_size) == (3, 224)
    assert config.mean == (0.485, 0.456, 0.406)
    assert config.std == (0.229, 0.224, 0.225)
    assert config.batch_bytes == 128 * 3 * 224 * 224 * 3
    assert config.limits.heartbeat_timeout == 3.0


@pytest.mark.parametrize("fmt", ["cifar10", "cifar100"])
def test_cifar_formats_default_to_cifar_preprocessing(tmp_path: Path, fmt: str) -> None:
    config = load_config(write(tmp_path, {"dataset": {"format": fmt, "path": "data"}}))
    assert config.preprocess == "cifar"
    assert config.augmix.severity == 3
    assert (config.image_size, config.mean, config.std) == (32, (0.5,) * 3, (0.5,) * 3)


def test_severity_default_follows_preprocess_not_format(tmp_path: Path) -> None:
    npz = {"dataset": {"format": "npz", "path": "train.npz"}}
    assert load_config(write(tmp_path, npz)).augmix.severity == 1
    cifar = load_config(write(tmp_path, {**npz, "preprocess": "cifar"}))
    assert (cifar.preprocess, cifar.augmix.severity, cifar.image_size) == ("cifar", 3, 32)
    imagenet = {"dataset": {"format": "cifar10", "path": "data"}, "preprocess": "imagenet"}
    assert load_config(write(tmp_path, imagenet)).augmix.severity == 1


def test_empty_sections_take_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "dataset: {format: npz, path: train.npz}\naugmix:\n"))
    assert config.augmix == AugMixConfig(severity=1)
    assert config.limits == Limits()


def test_jsd_false_is_one_view(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal(jsd=False, batch_size=2)))
    assert config.views == 1
    assert config.batch_bytes == 2 * 224 * 224 * 3


def test_augment_none_is_one_plain_view_and_refuses_jsd(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, minimal())).augment == "augmix"
    config = load_config(write(tmp_path, minimal(augment="none")))
    assert (config.augment, config.jsd, config.views) == ("none", False, 1)
    with pytest.raises(ConfigError, match="jsd: must be false with augment: none"):
        load_config(write(tmp_path, minimal(augment="none", jsd=True)))
    with pytest.raises(ConfigError, match="augment: must be one of augmix, none, got 'plain'"):
        load_config(write(tmp_path, minimal(augment="plain")))


# ---------------------------------------------------------------------------- every key


def test_every_key_is_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.dataset == DatasetConfig("npz", str(tmp_path / "train.npz"), False,
                                           S3Options("http://127.0.0.1:9000", "eu-west-1"))
    assert config.preprocess == "cifar"
    assert config.augmix == AugMixConfig(severity=5, width=4, depth=2, alpha=0.5, all_ops=True)
    assert (config.jsd, config.batch_size, config.seed, config.drop_last) == (False, 32, 7, True)
    assert config.augment == "none"
    assert config.image_size == 40 and config.layout.side == 40
    assert (config.error_policy, config.bind, config.workers) == (
        "fail",
        "tcp://127.0.0.1:6000",
        4,
    )
    assert config.limits == Limits(
        1 << 20, 0.25, 5, 1, 1 << 24, 1 << 26, 3, 9, 3, 5.5, 7.5, 9.5, 4096)
    expected = json.loads(json.dumps(FULL))
    expected["dataset"]["path"] = str(tmp_path / "train.npz")
    assert config.to_dict() == expected


def test_every_key_is_documented_in_the_module_docstring() -> None:
    import augserver.config

    block = []
    for line in augserver.config.__doc__.split("::", 1)[1].splitlines()[1:]:
        if line and not line.startswith(" "):
            break
        block.append(line)
    documented = yaml.safe_load("\n".join(block))
    def dotted(mapping: dict, prefix: str = "") -> set[str]:
        keys = set()
        for name, value in mapping.items():
            keys.add(prefix + name)
            if isinstance(value, dict):
                keys |= dotted(value, f"{prefix}{name}.")
        return keys

    assert dotted(documented) == set(KEYS)
    # The documented values are the defaults.
    only_dataset = {"dataset": documented["dataset"]}
    assert config_from_dict(documented, check_paths=False) == config_from_dict(
        only_dataset, check_paths=False
    )


def test_yaml_spellings_of_numbers(tmp_path: Path) -> None:
    text = (
        "dataset: {format: npz, path: train.npz}\n"
        "augmix: {alpha: 2, severity: 2.5}\n"
        "limits: {heartbeat_interval: 2, max_message_bytes: 1_048_576}\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.augmix.alpha == 2.0 and isinstance(config.augmix.alpha, float)
    assert config.augmix.severity == 2.5
    assert config.limits.heartbeat_interval == 2.0
    assert isinstance(config.limits.heartbeat_interval, float)
    assert config.limits.max_message_bytes == 1 << 20


@pytest.mark.parametrize("bind", ["tcp://*:5555", "tcp://[::1]:7000", "tcp://h:*", "ipc:///tmp/a"])
def test_bind_addresses(tmp_path: Path, bind: str) -> None:
    assert load_config(write(tmp_path, minimal(bind=bind))).bind == bind


def test_known_names_match_the_kernel() -> None:
    from augserver.config import ERROR_POLICIES
    from augserver.preprocessing import PREPROCESSINGS

    assert set(PREPROCESSINGS) == {"cifar", "imagenet"}
    assert PREPROCESSINGS["cifar"].image_size == transforms.CIFAR_CROP
    assert PREPROCESSINGS["cifar"].train is transforms.cifar_train
    assert ERROR_POLICIES == ("skip", "fail")
    assert set(datasets.FORMATS) == {"cifar10", "cifar100", "imagefolder", "npz", "webdataset"}


# ---------------------------------------------------------------------------- to_dict


def test_to_dict_round_trips_and_is_plain(tmp_path: Path) -> None:
    for data in (FULL, minimal(), {"dataset": {"format": "cifar100", "path": "data"}}):
        config = load_config(write(tmp_path, data))
        plain = config.to_dict()
        assert config_from_dict(plain) == config
        assert config_from_dict(plain, check_paths=False).to_dict() == plain
        # Through the wire formats the dispatcher may use, unchanged.
        assert msgpack.unpackb(msgpack.packb(plain)) == plain
        assert config_from_dict(json.loads(json.dumps(plain))) == config
        assert config_from_dict(yaml.safe_load(yaml.safe_dump(plain))) == config


def test_to_dict_is_a_copy(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()))
    plain = config.to_dict()
    plain["limits"]["worker_slots"] = 9
    assert config.limits.worker_slots == 2


def test_config_from_dict_without_base_dir_keeps_relative_paths() -> None:
    config = config_from_dict({"dataset": {"format": "npz", "path": "x.npz"}}, check_paths=False)
    assert config.dataset.path == "x.npz"
    with pytest.raises(ConfigError, match=r"^<config>: dataset.path: x.npz does not exist$"):
        config_from_dict({"dataset": {"format": "npz", "path": "x.npz"}})


def test_config_from_dict_does_not_mutate_its_input() -> None:
    data = {"dataset": {"format": "npz", "path": "/x.npz"}, "augmix": {"alpha": 1}}
    config_from_dict(data, check_paths=False)
    assert data == {"dataset": {"format": "npz", "path": "/x.npz"}, "augmix": {"alpha": 1}}


# ---------------------------------------------------------------------------- paths


def test_relative_path_is_relative_to_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "images").mkdir()
    path = write(tmp_path / "jobs", {"dataset": {"format": "imagefolder", "path": "../images"}})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    config = load_config(os.path.relpath(path))
    assert config.dataset.path == str(tmp_path / "images")
    assert os.path.isabs(config.dataset.path)


def test_absolute_path_is_kept(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    data = {"dataset": {"format": "imagefolder", "path": str(tmp_path / "elsewhere")}}
    assert load_config(write(tmp_path, data)).dataset.path == str(tmp_path / "elsewhere")


def test_missing_path_names_it_unless_unchecked(tmp_path: Path) -> None:
    data = {"dataset": {"format": "imagefolder", "path": "/nonexistent/train"}}
    message = error(tmp_path, data)
    assert message.endswith(": dataset.path: /nonexistent/train does not exist")
    config = load_config(write(tmp_path, data), check_paths=False)
    assert config.dataset.path == "/nonexistent/train"


def test_path_kind_must_fit_the_format(tmp_path: Path) -> None:
    npz_dir = {"dataset": {"format": "npz", "path": "data"}}
    assert f"dataset.path: {tmp_path / 'data'} is not a file" in error(tmp_path, npz_dir)
    folder_file = {"dataset": {"format": "cifar10", "path": "train.npz"}}
    assert f"dataset.path: {tmp_path / 'train.npz'} is not a directory" in error(
        tmp_path, folder_file
    )


# ---------------------------------------------------------------------------- overrides


def test_overrides_take_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    overrides = {"bind": "tcp://127.0.0.1:6001", "workers": 3, "augmix.severity": 2}
    config = load_config(path, overrides)
    assert (config.bind, config.workers, config.augmix.severity) == ("tcp://127.0.0.1:6001", 3, 2)
    assert config.augmix.width == 4  # the rest of the section stays
    assert config.limits == load_config(path).limits


def test_override_fills_a_section_missing_from_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()), {"limits.worker_slots": 1, "jsd": False})
    assert config.limits == Limits(worker_slots=1)
    assert config.views == 1


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal(workers=2)), {"workers": None, "bind": None})
    assert (config.workers, config.bind) == (2, "tcp://127.0.0.1:5555")


def test_overridden_path_is_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, minimal())
    (tmp_path / "data" / "val").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    assert load_config(path, {"dataset.path": "val"}).dataset.path == str(tmp_path / "data/val")


def test_unknown_override_key(tmp_path: Path) -> None:
    message = error(tmp_path, minimal(), {"wokers": 2})
    assert message.endswith("unknown override key 'wokers' (did you mean 'workers'?)")
    message = error(tmp_path, minimal(), {"augmx.severity": 2})
    assert message.endswith(
        "unknown override key 'augmx.severity' (did you mean 'augmix.severity'?)"
    )
    message = error(tmp_path, minimal(), {"heartbeat_interval": 2.0})
    assert "(did you mean 'limits.heartbeat_interval'?)" in message


def test_bad_override_value_is_marked_as_override(tmp_path: Path) -> None:
    message = error(tmp_path, minimal(), {"workers": -1})
    assert message.endswith(": workers (override): must be an integer >= 0, got -1")
    message = error(tmp_path, minimal(), {"augmix.severity": 11})
    assert message.endswith(": augmix.severity (override): must be in 1..10, got 11")
    # An error in the file itself is not blamed on the overrides.
    message = error(tmp_path, minimal(seed=-1), {"workers": 1})
    assert message.endswith(": seed: must be an integer >= 0, got -1")


def test_overrides_do_not_mutate_the_callers_mapping(tmp_path: Path) -> None:
    overrides = {"augmix.width": 2}
    load_config(write(tmp_path, minimal()), overrides)
    assert overrides == {"augmix.width": 2}


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        (minimal(batch_size="64"), "batch_size", "must be an integer >= 1, got '64'"),
        (minimal(batch_size=0), "batch_size", "must be an integer >= 1, got 0"),
        (minimal(batch_size=True), "batch_size", "must be an integer >= 1, got True"),
        (minimal(batch_size=64.0), "batch_size", "must be an integer >= 1, got 64.0"),
        (minimal(seed=-1), "seed", "must be an integer >= 0, got -1"),
        (minimal(seed=2**64), "seed", f"must be an integer >= 0, got {2**64}"),
        (minimal(workers=False), "workers", "must be an integer >= 0, got False"),
        (minimal(jsd="yes"), "jsd", "must be true or false, got 'yes'"),
        (minimal(jsd=1), "jsd", "must be true or false, got 1"),
        (minimal(drop_last=0), "drop_last", "must be true or false, got 0"),
        (
            minimal(preprocess="resnet"),
            "preprocess",
            "must be one of cifar, imagenet, got 'resnet'",
        ),
        (minimal(preprocess=None), "preprocess", "must be one of cifar, imagenet, got None"),
        (minimal(error_policy=None), "error_policy", "must be one of skip, fail, got None"),
        (minimal(error_policy="retry"), "error_policy", "must be one of skip, fail, got 'retry'"),
        (minimal(bind="localhost:5555"), "bind", "must be a ZeroMQ address"),
        (minimal(bind="tcp://localhost"), "bind", "must be a ZeroMQ address"),
        (minimal(bind=5555), "bind", "must be a ZeroMQ address"),
        (minimal(augmix={"severity": 12}), "augmix.severity", "must be in 1..10, got 12"),
        (minimal(augmix={"severity": True}), "augmix.severity", "must be a number, got True"),
        (minimal(augmix={"width": 0}), "augmix.width", "must be an integer >= 1, got 0"),
        (minimal(augmix={"width": "3"}), "augmix.width", "must be an integer >= 1, got '3'"),
        (minimal(augmix={"depth": 0}), "augmix.depth", "must be -1 (random 1..3) or an integer"),
        (minimal(augmix={"alpha": 0}), "augmix.alpha", "must be > 0, got 0.0"),
        (minimal(augmix={"alpha": "1"}), "augmix.alpha", "must be a number, got '1'"),
        (minimal(augmix={"alpha": float("inf")}), "augmix.alpha", "must be a finite number > 0"),
        (minimal(augmix={"all_ops": 1}), "augmix.all_ops", "must be true or false, got 1"),
        (minimal(augmix=[1, 2]), "augmix", "must be a mapping of severity, width"),
        (minimal(limits=3), "limits", "must be a mapping of max_message_bytes"),
        (
            minimal(limits={"max_message_bytes": 0}),
            "limits.max_message_bytes",
            "must be an integer >= 1, got 0",
        ),
        (
            minimal(limits={"heartbeat_interval": 0}),
            "limits.heartbeat_interval",
            "must be a number > 0, got 0",
        ),
        (
            minimal(limits={"heartbeat_interval": True}),
            "limits.heartbeat_interval",
            "must be a number > 0, got True",
        ),
        (
            minimal(limits={"heartbeat_misses": 0}),
            "limits.heartbeat_misses",
            "must be an integer >= 1, got 0",
        ),
        (
            minimal(limits={"worker_slots": 1.5}),
            "limits.worker_slots",
            "must be an integer >= 1, got 1.5",
        ),
        (
            minimal(limits={"max_prefetch_bytes": "1GB"}),
            "limits.max_prefetch_bytes",
            "must be an integer >= 1, got '1GB'",
        ),
        ({"seed": 1}, "dataset", "missing (required)"),
        ({"dataset": None}, "dataset", "missing (required)"),
        ({"dataset": "/data"}, "dataset",
         "must be a mapping of format, path, train, s3, got '/data'"),
        ({"dataset": {"format": "npz"}}, "dataset.path", "missing (required)"),
        (minimal(image_size=4), "image_size", "must be an integer in 8..1024 or null, got 4"),
        (minimal(image_size="64"), "image_size", "must be an integer in 8..1024"),
        ({"dataset": {"format": "npz", "path": ""}}, "dataset.path", "must be a non-empty string"),
        ({"dataset": {"format": "npz", "path": 3}}, "dataset.path", "must be a non-empty string"),
        ({"dataset": {"path": "data"}}, "dataset.format", "missing (required): one of cifar10"),
        (
            {"dataset": {"format": "imagenet", "path": "data"}},
            "dataset.format",
            "must be one of cifar10, cifar100, imagefolder, npz, webdataset, got 'imagenet'",
        ),
        (
            {"dataset": {"format": "imagefolder", "path": "data", "train": "no"}},
            "dataset.train",
            "must be true or false, got 'no'",
        ),
    ],
)
def test_invalid_values_name_file_and_key(
    tmp_path: Path, data: dict[str, Any], key: str, problem: str
) -> None:
    message = error(tmp_path, data)
    assert message.startswith(f"{tmp_path / 'config.yaml'}: {key}: {problem}"), message
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "config.yaml")
    assert info.value.key == key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(augmx={}), "unknown key 'augmx' (did you mean 'augmix'?)"),
        (minimal(batchsize=3), "unknown key 'batchsize' (did you mean 'batch_size'?)"),
        (
            minimal(augmix={"sevrity": 2}),
            "unknown key 'augmix.sevrity' (did you mean 'augmix.severity'?)",
        ),
        (minimal(limits={"workers": 2}), "unknown key 'limits.workers' (did you mean 'workers'?)"),
        (
            minimal(heartbeat_misses=2),
            "unknown key 'heartbeat_misses' (did you mean 'limits.heartbeat_misses'?)",
        ),
        (
            {"dataset": {"format": "npz", "path": "train.npz", "split": "val"}},
            "unknown key 'dataset.split'; valid keys here: format, path, train",
        ),
        (minimal(zzzzzz=1), "unknown key 'zzzzzz'; valid keys here: dataset, preprocess, augmix"),
    ],
)
def test_unknown_keys_at_every_level(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    got = error(tmp_path, data)
    assert f"config.yaml: {message}" in got, got


def test_non_string_keys_are_unknown_keys(tmp_path: Path) -> None:
    message = error(tmp_path, "dataset: {format: npz, path: train.npz}\n1: 2\n")
    assert "unknown key '1'; valid keys here: dataset, preprocess" in message


def test_no_suggestion_for_a_key_like_nothing(tmp_path: Path) -> None:
    assert "did you mean" not in error(tmp_path, minimal(zzzzzz=1))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("dataset: {format: npz, path: train.npz\n", "not valid YAML"),
        ("dataset: [unclosed\n", "not valid YAML"),
        (
            "",
            "the top level must be a mapping of keys (dataset: ..., augmix: ...), "
            "got an empty file",
        ),
        (
            "- dataset\n",
            "the top level must be a mapping of keys (dataset: ..., augmix: ...), got list",
        ),
        ("just a string\n", "got str 'just a string'"),
    ],
)
def test_unparseable_files(tmp_path: Path, text: str, problem: str) -> None:
    assert problem in error(tmp_path, text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_a_value_error_and_pickles(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, minimal(seed="x")))
    assert isinstance(info.value, ConfigError)
    copy = pickle.loads(pickle.dumps(info.value))
    assert (str(copy), copy.source, copy.key) == (str(info.value), info.value.source, "seed")


def test_config_from_dict_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^from dispatcher: batch_size: must be an integer"):
        config_from_dict(minimal(batch_size=-3), source="from dispatcher", check_paths=False)
    with pytest.raises(ConfigError, match=r"^<config>: the top level must be a mapping"):
        config_from_dict([1, 2])  # type: ignore[arg-type]
