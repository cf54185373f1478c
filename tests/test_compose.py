"""docker-compose.yml and deploy/, checked without a Docker engine: every service that
runs `vigil` is parsed by the real command line (its command and its VIGIL_ variables),
its ports are the ones it listens on, Prometheus scrapes what the services expose, and
promtool / amtool accept the configuration."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from vigil.cli import build_parser
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VIGIL = {name: s for name, s in SERVICES.items() if s.get("image") == "vigil:latest"}


def subcommand(name: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


def env_names(parser) -> set[str]:
    return {m for a in parser._actions for m in re.findall(r"\[env (VIGIL_\w+)\]", a.help or "")}


def parse(service: dict, monkeypatch):
    """The service's command as `vigil` parses it, with its environment and no other."""
    with monkeypatch.context() as m:
        for var in [v for v in os.environ if v.startswith("VIGIL_")]:
            m.delenv(var)
        for var, value in service.get("environment", {}).items():
            m.setenv(var, str(value))
        return build_parser().parse_args(service["command"])


def container_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def test_two_inference_replicas_and_no_service_that_does_not_exist():
    assert {"inference-1", "inference-2"} <= set(VIGIL)
    assert {"kafka", "prometheus", "alertmanager"} <= set(SERVICES)
    known = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
    for name, service in VIGIL.items():
        assert service["command"][0] in known, f"{name} runs `vigil {service['command'][0]}`, which does not exist"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"


@pytest.mark.parametrize("name", sorted(VIGIL))
def test_vigil_services_match_the_command_line(name, monkeypatch):
    service = VIGIL[name]
    unknown = set(service.get("environment", {})) - env_names(subcommand(service["command"][0]))
    assert not unknown, f"{name}: `vigil {service['command'][0]}` has no option for {sorted(unknown)}"
    args = parse(service, monkeypatch)  # a bad value would stop here, naming the variable
    if args.command in ("serve", "up"):
        assert args.host == "0.0.0.0", f"{name} must listen beyond the container's loopback"
        assert container_ports(service) == {args.port, args.metrics_port}
        host, port = args.bootstrap_servers.split(":")
        assert host in SERVICES and f"{host}:{port}" in SERVICES[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        volumes = [str(v).split(":")[1] for v in service.get("volumes", [])]
        assert args.outbox_dir in volumes, f"{name}: the outbox must be on a volume to outlive the container"


def test_kafka_runs_in_kraft_mode_and_every_advertised_listener_is_a_listener():
    env = SERVICES["kafka"]["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
    assert not any("ZOOKEEPER" in var for var in env)
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, address = item.split("://")
        assert listeners[name].split(":")[-1] == address.split(":")[-1]
    exposed = container_ports(SERVICES["kafka"])
    assert all(int(a.split(":")[-1]) in exposed for a in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
               if "localhost" in a)


def test_prometheus_scrapes_every_inference_replica(monkeypatch):
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for name, service in VIGIL.items():
        args = parse(service, monkeypatch)
        if getattr(args, "metrics_port", -1) >= 0:
            assert f"{name}:{args.metrics_port}" in targets
    alertmanager = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager == [f"alertmanager:{next(iter(container_ports(SERVICES['alertmanager'])))}"]


def test_mounted_configuration_exists():
    for name in ("prometheus", "alertmanager"):
        service = SERVICES[name]
        mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in service["volumes"] if v.startswith("./")}
        for flag in service["command"]:
            if flag.startswith("--config.file="):
                inside = flag.split("=", 1)[1]
                folder = next(m for m in mounts if inside.startswith(m + "/"))
                assert (mounts[folder] / inside[len(folder) + 1:]).is_file(), flag


def test_the_image_runs_vigil():
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["vigil"\]', dockerfile, re.M)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    defaults = build_parser().parse_args(["serve"])
    assert exposed == {defaults.port, defaults.metrics_port}
    cmd = re.search(r"^CMD (\[.+\])$", dockerfile, re.M).group(1)
    assert build_parser().parse_args(yaml.safe_load(cmd)).command == "serve"


def test_promtool_accepts_the_prometheus_configuration():
    result = subprocess.run([require_tool("promtool"), "check", "config", "prometheus.yml"], cwd=ROOT / "deploy",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_configuration():
    result = subprocess.run([require_tool("amtool"), "check-config", "alertmanager.yml"], cwd=ROOT / "deploy",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
