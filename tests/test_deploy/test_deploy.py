"""Static checks of the deployment files (no Docker engine or cluster needed): docker-compose.yml
and its CURVE override deploy/compose.curve.yml, deploy/Dockerfile*, deploy/augserver.yaml, the
Kubernetes manifests in deploy/k8s/ and the CURVE overlay deploy/k8s/overlays/curve/, as the
real `kubectl kustomize` builds them.

Every command line the files give to ``augserver`` is parsed with the real CLI parser, the
job files load with the real config loader, and the manifests validate against the
Kubernetes schemas that ``kubernetes-validate`` ships (offline).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from augserver.cli import build_parser
from augserver.config import load_config
from client.programs.train import build_parser as train_parser
from tests.service_helpers import REPO

pytestmark = pytest.mark.unit

ROOT = REPO
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CURVE = DEPLOY / "compose.curve.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
EXAMPLE_CONFIG = DEPLOY / "augserver.yaml"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
K8S_EXAMPLES = sorted((K8S / "examples").glob("*.yaml"))  # applied on their own, with -f
CURVE_OVERLAY = K8S / "overlays" / "curve"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize FOLDER`` builds (the real tool, offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]
PORT = 5555
METRICS_PORT = 9100
STATUS_PROBE = ["augserver", "status", "--connect", f"tcp://127.0.0.1:{PORT}", "--timeout", "3"]
_ENV_DEFAULT = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def expand(text: str) -> str:
    """``text`` with each ``${NAME:-default}`` replaced by its default (as Compose does with
    NAME unset); a variable without a default is an error here."""

    def default(match: re.Match[str]) -> str:
        if match[2] is None:
            raise AssertionError(f"{match[0]} has no default")
        return match[2]

    return _ENV_DEFAULT.sub(default, text)


def parse_cli(argv: list[str]) -> Any:
    """The CLI's parse of ``argv`` (without the leading ``augserver``); a flag or command the
    real parser does not know fails the test with argparse's message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"augserver {shlex.join(argv)}: {stderr.getvalue().strip()}")


def under(path: str, mount: str) -> bool:
    return PurePosixPath(mount) in (PurePosixPath(path), *PurePosixPath(path).parents)


# ---------------------------------------------------------------------------- the CLI helper


def test_parse_cli_rejects_unknown_flags_and_commands() -> None:
    assert parse_cli(["worker", "--connect", "tcp://x:1", "--procs", "2"]).procs == 2
    for argv in (["worker", "--connect", "tcp://x:1", "--threads", "2"], ["serve"], ["nope"]):
        with pytest.raises(pytest.fail.Exception):
            parse_cli(argv)
    assert expand("${A:-2} ${B-x}") == "2 x"
    with pytest.raises(AssertionError):
        expand("${NO_DEFAULT}")


# ---------------------------------------------------------------------------- example config


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE_CONFIG, check_paths=False)
    assert config.dataset.format == "imagefolder"
    assert config.dataset.path == "/data/train"
    assert config.preprocess == "imagenet"
    assert config.bind.endswith(f":{PORT}")


# ---------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    return [expand(a) for a in argv]


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) of a service's volumes, long or short syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (expand(source), "ro" in mode[0].split(",") if mode else False)
        else:
            mounts[volume["target"]] = (expand(volume["source"]), volume.get("read_only", False))
    return mounts


def test_compose_services(compose: dict[str, Any]) -> None:
    assert {"augserver", "worker"} <= set(compose["services"])
    for name in ("augserver", "worker"):
        assert compose["services"][name]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_dispatcher(compose: dict[str, Any]) -> None:
    service = compose["services"]["augserver"]
    args = parse_cli(_command(service))
    assert args.command == "serve"
    assert args.bind == f"tcp://0.0.0.0:{PORT}"
    assert args.workers == 2  # ${AUGSERVER_WORKERS:-2}
    assert args.metrics == f"0.0.0.0:{METRICS_PORT}"
    published = [expand(str(p)) for p in service["ports"]]
    assert any(p.split(":")[-1].split("/")[0] == str(PORT) for p in published), published
    # metrics: published by default only on a free loopback port of the host
    assert f"127.0.0.1::{METRICS_PORT}" in published, published
    assert service.get("restart") in ("always", "unless-stopped", "on-failure")
    assert service["healthcheck"]["test"][1:] == STATUS_PROBE
    parse_cli(service["healthcheck"]["test"][2:])

    mounts = _mounts(service)
    assert args.config in mounts, f"{args.config} is not mounted"
    source, read_only = mounts[args.config]
    assert read_only
    config = load_config(ROOT / source, check_paths=False)  # the default file exists here
    data_mounts = [t for t in mounts if under(config.dataset.path, t)]
    assert data_mounts, f"dataset.path {config.dataset.path} lies under no mounted volume"
    assert all(mounts[t][1] for t in data_mounts), "the dataset is mounted read-write"


def test_compose_worker_scales(compose: dict[str, Any]) -> None:
    service = compose["services"]["worker"]
    args = parse_cli(_command(service))
    assert args.command == "worker"
    assert args.connect == f"tcp://augserver:{PORT}"
    assert args.procs == 1
    assert "container_name" not in service
    for port in service.get("ports", []):  # a fixed host port would stop --scale worker=2
        assert ":" not in str(port), f"worker publishes the fixed host port {port}"
    config = load_config(ROOT / _mounts(compose["services"]["augserver"])[
        "/config/augserver.yaml"][0], check_paths=False)
    mounts = _mounts(service)
    assert any(under(config.dataset.path, t) and ro for t, (_, ro) in mounts.items()), (
        "workers need the dataset at the path the job file names"
    )


def test_compose_names_no_unknown_env_without_default() -> None:
    expand(COMPOSE.read_text())  # every ${VAR} has a default
    expand(COMPOSE_CURVE.read_text())


# ---------------------------------------------------------------------------- compose + CURVE

SECRETS_DIR = PurePosixPath("/run/secrets")


@pytest.fixture(scope="module")
def compose_curve() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_CURVE.read_text())
    assert isinstance(data, dict)
    return data


def _secret_paths(service: dict[str, Any]) -> dict[str, str]:
    """container path -> secret name of a service's secrets, short or long syntax."""
    paths = {}
    for secret in service.get("secrets", []):
        name, target = (secret, secret) if isinstance(secret, str) else (
            secret["source"], secret.get("target", secret["source"]))
        paths[str(SECRETS_DIR / target)] = name  # an absolute target stays as it is
    return paths


def test_compose_curve_secrets_declared(compose_curve: dict[str, Any]) -> None:
    declared = compose_curve["secrets"]
    used = {name for s in compose_curve["services"].values()
            for name in _secret_paths(s).values()}
    assert used == set(declared), "every secret used is declared, and none is left unused"
    for name, secret in declared.items():
        assert set(secret) == {"file"}, f"{name}: file-based secrets only"
        source = PurePosixPath(expand(secret["file"]))
        assert source.parent == PurePosixPath("keys"), f"{name}: not from ./keys/"
        assert source.name == name


def test_compose_curve_key_files_are_what_keys_writes(
    compose_curve: dict[str, Any], tmp_path: Path
) -> None:
    from augserver.security import ClientKeys, create_keys, key_pair

    files = {PurePosixPath(expand(s["file"])).name for s in compose_curve["secrets"].values()}
    names = sorted({name.split(".", 1)[0] for name in files})
    assert names == ["augserver", "worker"]
    for name in names:  # `augserver keys --out keys --name NAME`
        parse_cli(["keys", "--out", "keys", "--name", name])
        create_keys(tmp_path, name)
    written = {p.name for p in tmp_path.iterdir()}
    assert files <= written, files - written
    # the dispatcher's secret file serves as --server-key too (the health check does that)
    server = tmp_path / "augserver.key_secret"
    keys = ClientKeys.load(server, server)
    assert keys is not None and keys.server == key_pair(server)[0] == keys.public


def test_compose_curve_dispatcher(compose: dict[str, Any], compose_curve: dict[str, Any]) -> None:
    base = compose["services"]["augserver"]
    service = compose_curve["services"]["augserver"]
    secrets = _secret_paths(service)
    args = parse_cli(_command(service))
    plain = parse_cli(_command(base))
    for flag in ("command", "config", "bind", "workers", "metrics", "log_level"):
        assert getattr(args, flag) == getattr(plain, flag), f"the override changes --{flag}"
    assert args.curve_key in secrets and secrets[args.curve_key].endswith(".key_secret")
    mounts = _mounts(service)
    assert args.allow in mounts, f"--allow {args.allow} is not mounted"
    source, read_only = mounts[args.allow]
    assert read_only and PurePosixPath(source) == PurePosixPath("keys/allowed")
    assert args.allow not in _mounts(base)

    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:len(STATUS_PROBE) + 1] == STATUS_PROBE
    probe = parse_cli(test[2:])
    assert probe.key == probe.server_key == args.curve_key  # the secret holds the public key


def test_compose_curve_worker(compose: dict[str, Any], compose_curve: dict[str, Any]) -> None:
    service = compose_curve["services"]["worker"]
    secrets = _secret_paths(service)
    args = parse_cli(_command(service))
    plain = parse_cli(_command(compose["services"]["worker"]))
    for flag in ("command", "connect", "procs", "log_level"):
        assert getattr(args, flag) == getattr(plain, flag), f"the override changes --{flag}"
    assert secrets[args.key] == "worker.key_secret"
    assert secrets[args.server_key] == "augserver.key"
    assert "ports" not in service and "container_name" not in service


# ---------------------------------------------------------------------------- Dockerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m[1].upper(), m[2].strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)
    ]


def test_dockerfile_server_image() -> None:
    steps = _instructions(DOCKERFILE)
    kinds = [kind for kind, _ in steps]
    code = "\n".join(args for _, args in steps)
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert "torch" not in code.lower()
    installs = [args for kind, args in steps if kind == "RUN" and "pip install" in args]
    assert installs, "the package is not installed"
    for args in installs:  # the server and its S3 client, never the torch client extra
        assert "[client" not in args and "[test" not in args, f"installs an extra: {args}"
        assert "--no-cache-dir" in args
    assert any(re.search(r'pip install --no-cache-dir "\.\[s3\]"(\s|$)', args)
               for args in installs)

    for kind, args in steps:
        if kind in ("COPY", "ADD"):
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            assert all(s in ("pyproject.toml", "README.md", "augserver", "client", "./")
                       or s.endswith(".py") for s in sources), f"copies {args}"
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the kernels are warmed as the runtime user, into the NUMBA_CACHE_DIR it can write
    assert any(k == "ENV" and "NUMBA_CACHE_DIR=" in a for k, a in steps)
    warm = [i for i, (k, a) in enumerate(steps) if k == "RUN" and "warm-up" in a]
    assert warm and warm[0] > kinds.index("USER")
    argv = warm_up_command()
    assert argv[0] == "augserver" and build_parser().parse_args(argv[1:]).command == "warm-up"

    assert ("EXPOSE", str(PORT)) in steps
    (healthcheck,) = [args for kind, args in steps if kind == "HEALTHCHECK"]
    probe = yaml.safe_load(healthcheck.split("CMD", 1)[1])  # the exec form is a JSON list
    assert probe == STATUS_PROBE
    parse_cli(probe[1:])
    (entrypoint,) = [yaml.safe_load(a) for k, a in steps if k == "ENTRYPOINT"]
    assert entrypoint == ["augserver"]
    (cmd,) = [yaml.safe_load(a) for k, a in steps if k == "CMD"]
    assert parse_cli(cmd).config == "/config/augserver.yaml"
    assert any(k == "VOLUME" and "/config" in a and "/data" in a for k, a in steps)


def test_dockerignore_keeps_data_and_venv_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for name in (".git", ".venv", "data", "*.npz"):
        assert name in ignored
    for needed in ("augserver", "client", "pyproject.toml", "README.md"):
        assert needed not in ignored


# ---------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    """``kubectl apply -k deploy/k8s/`` and the examples: every object as the cluster gets it."""
    docs = kustomize(K8S) + [d for f in K8S_EXAMPLES for d in yaml.safe_load_all(f.read_text())
                             if d]
    assert docs
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_k8s_kustomization_lists_the_base() -> None:
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    manifests = sorted(p.name for p in K8S_BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == manifests
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_kustomization_builds_with_the_real_tool_and_validates(folder: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.utils.latest_version()
    docs = kustomize(folder)
    assert docs
    for doc in docs:
        assert "namespace" not in doc["metadata"], "manifests must be namespace-agnostic"
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomize_is_really_run(tmp_path: Path) -> None:
    """An overlay inside its own base is refused by the real tool (the mistake it caught)."""
    base = tmp_path / "base"
    shutil.copytree(K8S_BASE, base)
    (base / "inner").mkdir()
    (base / "inner" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        "  - ../\n")
    with pytest.raises(AssertionError, match="cycle detected"):
        kustomize(base / "inner")


def test_k8s_manifests_validate(manifests: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.utils.latest_version()
    for doc in manifests:
        assert "namespace" not in doc["metadata"], "manifests must be namespace-agnostic"
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_validation_can_fail() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "5555"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.utils.latest_version(), True)


def _pod(deployment: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def _volume_mounts(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, dict]:
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def test_k8s_dispatcher(manifests: list[dict[str, Any]]) -> None:
    configmap = _one(manifests, "ConfigMap", "augserver-config")
    dispatcher = _one(manifests, "Deployment", "augserver-dispatcher")
    service = _one(manifests, "Service", "augserver")
    assert dispatcher["spec"]["replicas"] == 1
    spec, container = _pod(dispatcher)
    args = parse_cli(container["args"])
    assert args.command == "serve"
    port = int(args.bind.rsplit(":", 1)[1])
    ports = {p["name"]: p for p in container["ports"]}
    assert set(ports) == {"zmq", "metrics"}
    container_port = ports["zmq"]
    assert container_port["containerPort"] == port
    assert args.metrics == f"0.0.0.0:{METRICS_PORT}"
    assert ports["metrics"]["containerPort"] == METRICS_PORT
    annotations = dispatcher["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(METRICS_PORT),
                           "prometheus.io/path": "/metrics"}
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port
    assert service_port["targetPort"] in (port, container_port["name"])
    assert service["spec"]["selector"].items() <= dispatcher["spec"]["template"]["metadata"][
        "labels"].items()

    mounts = _volume_mounts(spec, container)
    config_dir, config_name = args.config.rsplit("/", 1)
    assert mounts[config_dir]["configMap"]["name"] == "augserver-config"
    assert config_name in configmap["data"]
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command == STATUS_PROBE
        parse_cli(command[1:])
    assert container["resources"]["requests"]["cpu"]
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_k8s_configmap_and_dataset(manifests: list[dict[str, Any]], tmp_path: Path) -> None:
    configmap = _one(manifests, "ConfigMap", "augserver-config")
    job = tmp_path / "augserver.yaml"
    job.write_text(configmap["data"]["augserver.yaml"])
    config = load_config(job, check_paths=False)
    for name in ("augserver-dispatcher", "augserver-worker"):
        spec, container = _pod(_one(manifests, "Deployment", name))
        data = [(m, v) for m, v in _volume_mounts(spec, container).items()
                if under(config.dataset.path, m)]
        assert data, f"{name}: dataset.path {config.dataset.path} lies under no volume"
        ((_, volume),) = data
        assert volume["persistentVolumeClaim"]["claimName"] == "augserver-data"
        assert volume["persistentVolumeClaim"]["readOnly"] is True


def test_k8s_workers_and_autoscaler(manifests: list[dict[str, Any]]) -> None:
    worker = _one(manifests, "Deployment", "augserver-worker")
    service = _one(manifests, "Service", "augserver")
    spec, container = _pod(worker)
    args = parse_cli(container["args"])
    assert args.command == "worker"
    assert args.connect == f"tcp://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"] and container["resources"]["limits"]
    assert "livenessProbe" in container
    assert spec["securityContext"]["runAsNonRoot"] is True

    (hpa,) = [d for d in manifests if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", worker["metadata"]["name"])
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu"
               for m in hpa["spec"]["metrics"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_k8s_no_secrets_in_manifests(manifests: list[dict[str, Any]]) -> None:
    assert not [d for d in manifests if d["kind"] == "Secret"]


def test_trainer_image_and_compose_build_files(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
    trainer = compose["services"].get("trainer")
    if trainer is not None:
        assert trainer.get("profiles"), "the example trainer must not start by default"
    steps = _instructions(DEPLOY / "Dockerfile.trainer")
    installs = " ".join(a for k, a in steps if k == "RUN" and "pip install" in a)
    assert ".[client]" in installs and "torch" in installs.lower()
    assert any(k == "USER" and a.split(":")[0] not in ("root", "0") for k, a in steps)
    entry = next(json.loads(a) for k, a in steps if k == "ENTRYPOINT")
    assert entry == ["python", "-m", "client.programs.train"]
    # the image's default arguments and the compose service's parse with the trainer's parser
    default = next(json.loads(a) for k, a in steps if k == "CMD")
    for argv in (default, (trainer or {}).get("command", default)):
        args = train_parser().parse_args([str(a) for a in argv])
        assert args.connect == "tcp://augserver:5555" and args.num_classes


# ---------------------------------------------------------------------------- Kubernetes + CURVE


@pytest.fixture(scope="module")
def curve_overlay(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The overlay as ``kubectl kustomize`` builds it: {Deployment name: patched Deployment};
    it also keeps every other object of the base unchanged."""
    kustomization = yaml.safe_load((CURVE_OVERLAY / "kustomization.yaml").read_text())
    assert [(CURVE_OVERLAY / r).resolve() for r in kustomization["resources"]] == [K8S_BASE]
    assert "namespace" not in kustomization
    built = kustomize(CURVE_OVERLAY)
    patched = {d["metadata"]["name"]: d for d in built if d["kind"] == "Deployment"}
    assert set(patched) == {"augserver-dispatcher", "augserver-worker"}
    others = [d for d in built if d["kind"] != "Deployment"]
    assert others == [d for d in kustomize(K8S) if d["kind"] != "Deployment"]
    return patched


def test_k8s_curve_overlay_validates(curve_overlay: dict[str, dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.utils.latest_version()
    for doc in curve_overlay.values():
        kubernetes_validate.validate(doc, version, strict=True)


def _key_volume(spec: dict[str, Any], container: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(mount path, secret volume source) of the overlay's curve-keys volume."""
    ((path, volume),) = [(m, v) for m, v in _volume_mounts(spec, container).items()
                         if v["name"] == "curve-keys"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "curve-keys"]
    assert mount["readOnly"] is True
    secret = volume["secret"]
    assert secret["secretName"] == "augserver-curve-keys"
    assert secret["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    return path, secret


def _in_volume(path: str, mount: str, secret: dict[str, Any]) -> str:
    """The Secret key that ``path`` (under ``mount``) shows."""
    relative = str(PurePosixPath(path).relative_to(mount))
    if "items" not in secret:
        return relative
    (key,) = [i["key"] for i in secret["items"] if i["path"] == relative]
    return key


def _curve_pod(
    manifests: list[dict[str, Any]],
    curve_overlay: dict[str, dict[str, Any]],
    name: str,
    kept: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Deployment ``name`` with the CURVE overlay: its pod spec, container and parsed args,
    after checking that the overlay kept the base manifest's ``kept`` flags."""
    spec, container = _pod(curve_overlay[name])
    _, plain_container = _pod(_one(manifests, "Deployment", name))
    args = parse_cli(container["args"])
    plain = parse_cli(plain_container["args"])
    for flag in kept:
        assert getattr(args, flag) == getattr(plain, flag)
    return spec, container, args


def test_k8s_curve_dispatcher(manifests: list[dict[str, Any]],
                              curve_overlay: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    from augserver.security import create_keys

    spec, container, args = _curve_pod(
        manifests, curve_overlay, "augserver-dispatcher",
        ("command", "config", "bind", "workers", "metrics"),
    )  # fmt: skip
    mount, secret = _key_volume(spec, container)
    assert "items" not in secret  # the whole Secret: its NAME.key files are the allow-list
    assert args.allow == mount
    create_keys(tmp_path, "augserver")
    written = {p.name for p in tmp_path.iterdir()}
    assert _in_volume(args.curve_key, mount, secret) == "augserver.key_secret" in written
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:len(STATUS_PROBE)] == STATUS_PROBE
        status = parse_cli(command[1:])
        assert status.key == status.server_key == args.curve_key


def test_k8s_curve_worker(manifests: list[dict[str, Any]],
                          curve_overlay: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    from augserver.security import create_keys

    spec, container, args = _curve_pod(
        manifests, curve_overlay, "augserver-worker", ("command", "connect", "procs")
    )
    mount, secret = _key_volume(spec, container)
    for name in ("augserver", "worker"):
        create_keys(tmp_path, name)
    written = {p.name for p in tmp_path.iterdir()}
    assert _in_volume(args.key, mount, secret) == "worker.key_secret" in written
    assert _in_volume(args.server_key, mount, secret) == "augserver.key" in written
    assert {i["key"] for i in secret["items"]} == {"worker.key_secret", "augserver.key"}


def test_k8s_curve_keys_documented() -> None:
    """deploy/README.md names the Secret's files and the overlay exactly as they are used."""
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl apply -k deploy/k8s/overlays/curve" in readme
    assert "kubectl create secret generic augserver-curve-keys" in readme
    for name in ("augserver.key_secret", "augserver.key", "worker.key_secret", "worker.key"):
        assert f"--from-file=keys/{name}" in readme
    assert "docker compose -f docker-compose.yml -f deploy/compose.curve.yml" in readme


def warm_up_command() -> list[str]:
    """The command (exec form) the image runs to compile the kernels into its cache."""
    steps = _instructions(DEPLOY / "Dockerfile")
    (run,) = [a for k, a in steps if k == "RUN" and "warm-up" in a]
    return json.loads(run)



def test_k8s_gpu_trainer_job_sits_next_to_the_dispatcher_and_workers() -> None:
    """deploy/k8s/overlays/gpu-trainer: the base plus a GPU Job running the example trainer,
    built with the real kubectl kustomize; it may reach the dispatcher and resumes from its
    checkpoint volume."""
    docs = kustomize(K8S / "overlays" / "gpu-trainer")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "augserver-dispatcher"), ("Deployment", "augserver-worker"),
            ("Service", "augserver"), ("Job", "augserver-trainer"),
            ("PersistentVolumeClaim", "augserver-checkpoints")} <= kinds
    job = _one(docs, "Job", "augserver-trainer")
    pod = job["spec"]["template"]
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    policy = _one(docs, "NetworkPolicy", "augserver-dispatcher")
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert admitted.items() <= pod["metadata"]["labels"].items()  # may reach the dispatcher
    args = train_parser().parse_args(container["args"])  # the trainer accepts its arguments
    assert args.connect == "tcp://augserver:5555" and args.device == "cuda" and args.resume
    mounts = _volume_mounts(spec, container)
    assert Path(args.checkpoint).parent == Path("/checkpoints")
    assert mounts["/checkpoints"]["persistentVolumeClaim"]["claimName"] == "augserver-checkpoints"
    assert "Dockerfile.trainer" in (K8S / "overlays" / "gpu-trainer" / "kustomization.yaml"
                                    ).read_text()


def _arena_bytes(config_text: str) -> int:
    """The shared memory a default trainer's arena takes for this job file: prefetch slots of
    one batch's views (augserver.shm)."""
    import inspect

    from augserver.config import config_from_dict
    from augserver.shm import arena_bytes, slot_bytes
    from client.loader import RemoteAugMixLoader

    config = config_from_dict(yaml.safe_load(config_text), check_paths=False)
    prefetch = inspect.signature(RemoteAugMixLoader).parameters["prefetch"].default
    return arena_bytes(prefetch, slot_bytes(config.layout.views_bytes(config.batch_size)))


_SIZE = re.compile(r"(\d+)\s*([kmg]?)i?b?", re.IGNORECASE)


def _bytes(size: str) -> int:
    number, unit = _SIZE.fullmatch(size.strip()).groups()
    return int(number) * 1024 ** " kmg".index(unit.lower() or " ")


def test_compose_shares_one_dev_shm_between_augserver_its_workers_and_the_trainer(
        compose: dict[str, Any]) -> None:
    """The same-host path: the augserver container's IPC namespace (its /dev/shm) is
    shareable, workers and trainer join it, it holds the trainer's arena, and every image
    runs as the same uid (the arena is owner-only)."""
    services = compose["services"]
    assert services["augserver"]["ipc"] == "shareable"
    for name in ("worker", "trainer"):
        assert services[name]["ipc"] == "service:augserver", name
    shm_size = _bytes(expand(str(services["augserver"]["shm_size"])))
    source = _mounts(services["augserver"])["/config/augserver.yaml"][0]
    assert shm_size >= 2 * _arena_bytes((ROOT / source).read_text())  # and one reconnect's
    users = {re.search(r"--uid (\d+)", (DEPLOY / f).read_text())[1]
             for f in ("Dockerfile", "Dockerfile.trainer")}
    assert users == {"10001"}


def test_k8s_trainer_sidecar_shares_a_memory_emptydir_at_dev_shm() -> None:
    """deploy/k8s/overlays/trainer-sidecar, built with the real kubectl kustomize: a GPU
    trainer with augserver as a native sidecar, both mounting one emptyDir of medium Memory
    at /dev/shm, the trainer connecting to the sidecar's loopback dispatcher, one uid."""
    docs = kustomize(K8S / "overlays" / "trainer-sidecar")
    job = _one(docs, "Job", "augserver-trainer-sidecar")
    spec = job["spec"]["template"]["spec"]
    (sidecar,), (trainer,) = spec["initContainers"], spec["containers"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: the Job ends with the trainer
    serve = parse_cli(sidecar["args"])
    assert serve.command == "serve" and serve.workers >= 1
    assert serve.bind.startswith("tcp://127.0.0.1:")  # loopback: secure without CURVE
    train = train_parser().parse_args(trainer["args"])
    assert train.connect == serve.bind and train.device == "cuda"
    shm = {_volume_mounts(spec, c)["/dev/shm"]["name"] for c in (sidecar, trainer)}
    (name,) = shm
    volume = next(v for v in spec["volumes"] if v["name"] == name)
    assert volume["emptyDir"]["medium"] == "Memory"
    for container in (sidecar, trainer):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env.get("AUGSERVER_SHM_DIR", "/dev/shm") == "/dev/shm"
        assert "runAsUser" not in container.get("securityContext", {})  # the pod's, for both
    assert spec["securityContext"]["runAsUser"] == 10001
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    mounts = _volume_mounts(spec, sidecar)
    assert mounts["/config"]["configMap"]["name"] == config_map["metadata"]["name"]
    job_file = config_map["data"]["augserver.yaml"]
    assert _bytes(volume["emptyDir"]["sizeLimit"]) >= 2 * _arena_bytes(job_file)
    assert parse_cli(sidecar["startupProbe"]["exec"]["command"][1:]).command == "status"
