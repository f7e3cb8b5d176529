"""CURVE: key files, an allow-listed dispatcher, refused strangers, config and CLI."""

from __future__ import annotations

import logging
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from augserver import worker as worker_module
from augserver.cli import main
from augserver.config import ConfigError, load_config
from augserver.dispatcher import Dispatcher
from augserver.security import ClientKeys, allowed_keys, create_keys
from augserver.status import StatusError, request_status
from augserver.worker import run_worker
from client import RemoteAugMixLoader
from tests.service_helpers import (
    RawClient,
    dispatcher_thread,
    end_process,
    free_port,
    make_npz,
    spawn,
    wait_for,
    write_config,
)

pytestmark = [
    pytest.mark.service,
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE"),
]

ROLES = ("server", "worker", "client", "stranger")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    """Key pairs for each role under keys/, and allow/ with the worker and client keys."""
    folder, allow = tmp_path / "keys", tmp_path / "allow"
    allow.mkdir()
    pairs = {role: create_keys(folder, role) for role in ROLES}
    for role in ("worker", "client"):
        shutil.copy(pairs[role][0], allow)
    return {"dir": folder, "allow": allow, **pairs}


def curve_config(tmp_path: Path, keys: dict[str, Any], **extra: Any) -> Path:
    security = {"curve": True, "server_key": str(keys["server"][1]),
                "allow_dir": str(keys["allow"])}
    return write_config(tmp_path, make_npz(tmp_path, n=24), security=security, **extra)


def client_keys(keys: dict[str, Any], role: str) -> ClientKeys:
    loaded = ClientKeys.load(keys[role][1], keys["server"][0])
    assert loaded is not None
    return loaded


def epoch_indices(loader: RemoteAugMixLoader) -> list[int]:
    return sorted(int(i) for batch in loader for i in batch.index)


def workers_running(address: str, keys: ClientKeys, count: int, stop: threading.Event,
                    names: str = "w") -> list[threading.Thread]:
    threads = [threading.Thread(target=run_worker, args=(address, f"{names}{i}", stop, keys),
                                daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


# ---------------------------------------------------------------------------- keys command


def test_keys_command_writes_a_pair_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "--out", str(tmp_path / "k"), "--name", "node"]) == 0
    public, secret = tmp_path / "k" / "node.key", tmp_path / "k" / "node.key_secret"
    assert "allow-list" in capsys.readouterr().out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert zmq.auth.load_certificate(str(public)) == (pub, None)
    assert zmq.curve_public(sec) == pub
    before = secret.read_bytes()
    assert main(["keys", "--out", str(tmp_path / "k"), "--name", "node"]) == 1
    assert "not overwriting" in capsys.readouterr().err
    assert secret.read_bytes() == before


# ---------------------------------------------------------------------------- traffic


def test_allowed_peers_get_an_epoch_and_strangers_are_refused(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    config = load_config(curve_config(tmp_path, keys))
    stop = threading.Event()
    with dispatcher_thread(config) as dispatcher:
        threads = workers_running(dispatcher.address, client_keys(keys, "worker"), 1, stop)
        try:
            trusted = dict(curve_key=keys["client"][1], server_key=keys["server"][0])
            loader = RemoteAugMixLoader(dispatcher.address, timeout=20, **trusted)
            assert epoch_indices(loader) == list(range(24))  # every sample exactly once
            stranger = RemoteAugMixLoader(dispatcher.address, timeout=1.0,
                                          curve_key=keys["stranger"][1],
                                          server_key=keys["server"][0])
            with pytest.raises(TimeoutError, match="CURVE authentication failed"):
                len(stranger)
            with pytest.raises(TimeoutError, match="the dispatcher requires CURVE: pass curve_key"):
                len(RemoteAugMixLoader(dispatcher.address, timeout=1.0))
            # The dispatcher never saw the strangers and still serves the allowed client.
            again = RemoteAugMixLoader(dispatcher.address, epoch=1, timeout=20, **trusted)
            assert epoch_indices(again) == list(range(24))
            stats = request_status(dispatcher.address, 5.0, client_keys(keys, "server"))
            assert len(stats.workers) == 1
            assert stats.counters.malformed_messages == 0
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)


def test_a_worker_without_an_allowed_key_cannot_join(
    tmp_path: Path, keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(worker_module, "HANDSHAKE_TIMEOUT", 0.5)
    config = load_config(curve_config(tmp_path, keys))
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, "augserver.worker"), \
            dispatcher_thread(config) as dispatcher:
        threads = [threading.Thread(target=run_worker, args=(dispatcher.address, "nokey", stop),
                                    daemon=True)]
        threads[0].start()
        threads += workers_running(dispatcher.address, client_keys(keys, "stranger"), 1, stop,
                                   "stranger")
        with RawClient(dispatcher.address, client_keys(keys, "client")) as client:
            try:
                assert client.hello()["dataset_len"] == 24
                assert client.open(credits=4).type == "opened"  # tasks are waiting
                time.sleep(1.5)
                stats = request_status(dispatcher.address, 5.0, client_keys(keys, "server"))
                assert stats.workers == []
                assert dispatcher.state.tasks == {}  # no task ever went out
                assert client.recv(timeout=0.2) is None
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=10)
        with pytest.raises(StatusError, match="CURVE"):
            request_status(dispatcher.address, 0.5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("nokey" in m and "the dispatcher requires CURVE: pass --key" in m for m in messages)
    assert any("stranger" in m and "allow-list" in m for m in messages)


def test_serve_with_curve_flags_runs_local_workers(
    tmp_path: Path, keys: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    path = write_config(tmp_path, make_npz(tmp_path, n=24), bind=address)
    proc = spawn(["serve", "--config", str(path), "--workers", "1", "--log-level", "WARNING",
                  "--curve-key", str(keys["server"][1]), "--allow", str(keys["allow"])])
    try:
        server = client_keys(keys, "server")

        def one_worker() -> bool:
            try:
                return len(request_status(address, 1.0, server).workers) == 1
            except StatusError:
                return False

        wait_for(one_worker, 20, "the local worker with the dispatcher's key")
        loader = RemoteAugMixLoader(address, timeout=20, curve_key=keys["client"][1],
                                    server_key=keys["server"][0])
        assert epoch_indices(loader) == list(range(24))
        flags = ["--key", str(keys["server"][1]), "--server-key", str(keys["server"][0])]
        assert main(["status", "--connect", address, "--json", *flags]) == 0
        assert '"workers"' in capsys.readouterr().out
        assert main(["status", "--connect", address, "--timeout", "0.5"]) == 1
        assert "CURVE" in capsys.readouterr().err
    finally:
        assert end_process(proc) == 0


# ---------------------------------------------------------------------------- config


def test_curve_config_needs_both_keys(tmp_path: Path, keys: dict[str, Any]) -> None:
    data = make_npz(tmp_path, n=4)
    server_key, allow = str(keys["server"][1]), str(keys["allow"])
    cases = [
        ({"curve": True}, "security.server_key: required with curve"),
        ({"curve": True, "server_key": server_key}, "security.allow_dir: required with curve"),
        ({"curve": True, "server_key": "nope.key_secret", "allow_dir": allow},
         "security.server_key: .*nope.key_secret is not a file"),
        ({"curve": True, "server_key": server_key, "allow_dir": server_key},
         "security.allow_dir: .* is not a directory"),
        ({"curve": "yes", "server_key": server_key, "allow_dir": allow},
         "security.curve: must be true or false"),
        ({"curve": True, "server_key": 3, "allow_dir": allow}, "security.server_key: must be"),
        ({"curv": True}, "did you mean 'security.curve'"),
    ]
    for security, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, data, security=security))
    assert not load_config(write_config(tmp_path, data)).security.curve  # off by default


def test_curve_flags_override_the_file(
    tmp_path: Path, keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, make_npz(tmp_path, n=4))
    monkeypatch.chdir(keys["dir"])
    config = load_config(path, {"security.curve": True, "security.server_key": "server.key_secret",
                                "security.allow_dir": str(keys["allow"])})
    assert config.security.curve
    assert config.security.server_key == str(keys["server"][1])  # relative to the cwd
    with pytest.raises(ConfigError, match=r"security.allow_dir: required"):
        load_config(path, {"security.curve": True, "security.server_key": "server.key_secret"})


def test_half_a_key_pair_is_an_error(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="both keys"):
        RemoteAugMixLoader("tcp://127.0.0.1:1", curve_key=keys["client"][1])
    with pytest.raises(ValueError, match="no secret key"):
        ClientKeys.load(keys["client"][0], keys["server"][0])
    public, secret = zmq.curve_keypair()
    pair = ClientKeys.load(secret, zmq.curve_keypair()[0])  # Z85 bytes instead of files
    assert pair is not None and pair.public == public


@pytest.mark.parametrize("content", ["garbage\nnot a key\n",
                                     'metadata\ncurve\n    public-key = "short"\n'])
def test_a_malformed_key_in_the_allow_list_is_an_error_naming_the_file(
    tmp_path: Path, keys: dict[str, Any], capsys: pytest.CaptureFixture[str], content: str
) -> None:
    bad = keys["allow"] / "intruder.key"
    bad.write_text(content)
    path = curve_config(tmp_path, keys)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    bad.unlink()  # the other keys are still admitted
    assert len(allowed_keys(keys["allow"])) == 2


def test_a_bind_other_hosts_reach_needs_curve_or_an_explicit_opt_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data = make_npz(tmp_path, n=4)
    open_bind = f"tcp://0.0.0.0:{free_port()}"
    path = write_config(tmp_path, data, bind=open_bind)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "security.insecure" in err and "CURVE" in err and open_bind in err
    with caplog.at_level(logging.WARNING, "augserver.dispatcher"):
        d = Dispatcher(load_config(write_config(tmp_path, data, bind=open_bind,
                                                security={"insecure": True})))
        d.close()
    assert any("SECURITY" in r.getMessage() and open_bind in r.getMessage()
               for r in caplog.records)
    for local in ("tcp://127.0.0.1:0", "ipc:///tmp/augserver-test-bind"):
        Dispatcher(load_config(write_config(tmp_path, data, bind=local))).close()
