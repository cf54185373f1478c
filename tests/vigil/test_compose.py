"""docker-compose.yml and deploy/, checked without a Docker engine: every service that
runs `vigil` is parsed by the real command line (its command and its VIGIL_ variables),
its ports are the ones it listens on, Prometheus scrapes what the services expose, and
promtool / amtool accept the configuration. The Grafana dashboard queries only metrics the
services' own Prometheus registries define, through the provisioned data source; its and
the rules' PromQL is checked by promtool."""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from vigil.cli import build_parser
from tests.helpers.tools import require_tool
from tests.helpers import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VIGIL = {name: s for name, s in SERVICES.items() if s.get("image") == "vigil:latest"}
DASHBOARDS = ROOT / "deploy/grafana/dashboards"
PROVISIONING = ROOT / "deploy/grafana/provisioning"

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


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a named volume, or a path from the repository root)."""
    out = {}
    for v in service.get("volumes", []):
        source, target = str(v).split(":")[:2]
        out[target] = source
    return out


def repo_path(service: dict, inside: str) -> Path | None:
    """The repository file or folder a bind mount shows at `inside` in the container."""
    for target, source in mounts(service).items():
        if source.startswith("./") and (inside == target or inside.startswith(target + "/")):
            return ROOT / source[2:] / inside[len(target) + 1:] if inside != target else ROOT / source[2:]
    return None


def listening(args) -> tuple[str, set[int], int]:
    """(address, ports, metrics port) of a parsed service command."""
    if args.command in ("serve", "up"):
        return args.host, {args.port, args.metrics_port}, args.metrics_port
    if args.command == "process":
        return args.metrics_host, {args.metrics_port}, args.metrics_port
    if args.command == "alerting":
        return args.admin_host, {args.admin_port}, args.admin_port
    if args.command == "rollout":
        return args.host, {args.admin_port}, args.admin_port
    raise AssertionError(f"`vigil {args.command}` is not a service")


def by_command(command: str) -> dict[str, dict]:
    return {name: s for name, s in VIGIL.items() if s["command"][0] == command}


# ---- the services --------------------------------------------------------------------


def test_the_whole_loop_runs_and_no_service_that_does_not_exist():
    assert len(by_command("serve")) == 2, "two inference replicas"
    assert len(by_command("process")) == 2, "two stream processors"
    assert len(by_command("alerting")) == 1 and len(by_command("rollout")) == 1
    assert {"kafka", "prometheus", "alertmanager", "grafana"} <= set(SERVICES)
    known = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
    for name, service in VIGIL.items():
        assert service["command"][0] in known, f"{name} runs `vigil {service['command'][0]}`, which does not exist"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(VIGIL))
def test_vigil_services_match_the_command_line(name, monkeypatch):
    service = VIGIL[name]
    unknown = set(service.get("environment", {})) - env_names(subcommand(service["command"][0]))
    assert not unknown, f"{name}: `vigil {service['command'][0]}` has no option for {sorted(unknown)}"
    args = parse(service, monkeypatch)  # a bad value would stop here, naming the variable
    assert getattr(args, "alerting_command", None) is None and getattr(args, "rollout_command", None) is None, \
        f"{name} must run the service, not a one-off command"
    host, ports, _ = listening(args)
    assert host == "0.0.0.0", f"{name} must listen beyond the container's loopback"
    assert container_ports(service) == ports, f"{name} listens on {sorted(ports)}"
    for address in args.bootstrap_servers.split(","):
        host, port = address.split(":")
        assert host in SERVICES and f"{host}:{port}" in SERVICES[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    outbox = getattr(args, "outbox_dir", None)
    if outbox is not None:
        assert outbox in mounts(service), f"{name}: the outbox must be on a volume to outlive the container"
        assert mounts(service)[outbox] in COMPOSE["volumes"], f"{name}: the outbox volume must be a named volume"
        # a named volume takes the owner of the folder the image has there: the image's user
        assert re.search(rf"mkdir -p .*{re.escape(outbox)}\b", (ROOT / "deploy/Dockerfile").read_text()), \
            f"{name}: deploy/Dockerfile must create {outbox} for its user"


def test_host_ports_are_not_published_twice():
    published = [str(p).split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_the_processors_share_one_consumer_group_and_the_partitions_go_round(monkeypatch):
    from eventbus.topics import TopicOptions

    processors = [parse(s, monkeypatch) for s in by_command("process").values()]
    assert len({a.group_id for a in processors}) == 1, "processors in one group share the partitions"
    assert len({a.metrics_port for a in processors}) == 1
    # every service that creates the topics creates them alike, with a partition for each processor
    partitions = {TopicOptions().partitions}  # what `vigil process` creates the topics it needs with
    for name in [*by_command("serve"), *by_command("alerting")]:
        partitions.add(parse(VIGIL[name], monkeypatch).topic_partitions)
    assert len(partitions) == 1 and partitions.pop() >= len(processors)


def test_the_rollout_controller_is_one_leader_group(monkeypatch):
    groups = {parse(s, monkeypatch).group_id for s in by_command("rollout").values()}
    assert groups == {"vigil-rollout"}
    for name in by_command("process"):
        assert parse(VIGIL[name], monkeypatch).group_id not in groups


def test_alerting_posts_to_alertmanager_with_a_valid_configuration(monkeypatch):
    """`vigil alerting` feeds Alertmanager through its v2 API (alerting/sinks.py), not the
    other way round: its configuration names the compose Alertmanager, and its rules load."""
    from alerting.cli import _files
    from alerting.config import load_config
    from alerting.rules import check_files

    (name, service), = by_command("alerting").items()
    args = parse(service, monkeypatch)
    config_file = repo_path(service, args.config)
    assert config_file is not None and config_file.is_file(), f"{name}: {args.config} is not mounted from the repo"
    config = load_config(config_file)
    port = next(iter(container_ports(SERVICES["alertmanager"])))
    assert [t.url for t in config.alertmanagers] == [f"http://alertmanager:{port}"]
    assert config.external_url == f"http://localhost:{args.admin_port}"
    rules, errors = check_files(_files(args.rules))
    assert not errors and rules, errors


def test_alertmanager_notifies_vigils_own_alerts(monkeypatch):
    """What `vigil alerting` posts reaches a receiver, by the routes of deploy/alertmanager.yml."""
    from alerting.cli import _files

    args = parse(next(iter(by_command("alerting").values())), monkeypatch)
    severities = {r.get("labels", {}).get("severity") for f in _files(args.rules)
                  for g in yaml.safe_load(Path(f).read_text())["groups"] for r in g["rules"]}
    receivers = {r["name"]: r for r in yaml.safe_load((ROOT / "deploy/alertmanager.yml").read_text())["receivers"]}
    for severity in sorted(s for s in severities if s):
        result = subprocess.run([require_tool("amtool"), "config", "routes", "test", "--config.file=alertmanager.yml",
                                 "alertname=MeanLogprobDrift", f"severity={severity}", "model=m", "version=2"],
                                cwd=ROOT / "deploy", capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        for receiver in result.stdout.split():
            assert receivers[receiver].get("webhook_configs"), f"{severity} alerts go to {receiver}, which sends nothing"


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


def test_mounted_configuration_exists():
    for name in ("prometheus", "alertmanager"):
        service = SERVICES[name]
        for flag in service["command"]:
            if flag.startswith("--config.file="):
                path = repo_path(service, flag.split("=", 1)[1])
                assert path is not None and path.is_file(), flag
    for name, service in SERVICES.items():
        for target, source in mounts(service).items():
            if source.startswith("./"):
                assert (ROOT / source[2:]).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in COMPOSE["volumes"], f"{name} mounts an undeclared volume {source}"


def test_the_image_runs_vigil(monkeypatch):
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["vigil"\]', dockerfile, re.M)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    used = set().union(*(listening(parse(s, monkeypatch))[1] for s in VIGIL.values()))
    assert exposed == used, "EXPOSE lists the ports the services listen on"
    cmd = re.search(r"^CMD (\[.+\])$", dockerfile, re.M).group(1)
    assert build_parser().parse_args(yaml.safe_load(cmd)).command == "serve"


# ---- Prometheus ------------------------------------------------------------------------


def prometheus_config() -> dict:
    return yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())


def scrape_jobs() -> dict[str, set[str]]:
    return {job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
            for job in prometheus_config()["scrape_configs"]}


def test_prometheus_scrapes_every_vigil_service(monkeypatch):
    targets = set().union(*scrape_jobs().values())
    for name, service in VIGIL.items():
        _, _, metrics_port = listening(parse(service, monkeypatch))
        assert metrics_port >= 0, f"{name} has its metrics turned off"
        assert f"{name}:{metrics_port}" in targets, f"Prometheus does not scrape {name}"
    for target in targets:  # and nothing that is not there
        host, port = target.split(":")
        if host != "localhost":
            assert host in SERVICES and int(port) in container_ports(SERVICES[host]), target
    alertmanager = prometheus_config()["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager == [f"alertmanager:{next(iter(container_ports(SERVICES['alertmanager'])))}"]


def test_one_scrape_job_per_vigil_command():
    """So `up{job=...}` in the rules and the dashboard means one kind of service."""
    for job, targets in scrape_jobs().items():
        commands = {VIGIL[t.split(":")[0]]["command"][0] for t in targets if t.split(":")[0] in VIGIL}
        assert len(commands) <= 1, f"{job} mixes {commands}"


def test_promtool_accepts_the_prometheus_configuration():
    result = subprocess.run([require_tool("promtool"), "check", "config", "prometheus.yml"], cwd=ROOT / "deploy",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule files found" in result.stdout and "SUCCESS: 0 rule files" not in result.stdout, result.stdout


def test_promtool_accepts_the_rules():
    result = subprocess.run([require_tool("promtool"), "check", "rules", "prometheus-rules.yml"],
                            cwd=ROOT / "deploy", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_configuration():
    result = subprocess.run([require_tool("amtool"), "check-config", "alertmanager.yml"], cwd=ROOT / "deploy",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- metric names: what the code exports, what PromQL asks for --------------------------

SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "stateset": ("",),
            "gaugehistogram": ("_bucket", "_gcount", "_gsum"), "unknown": ("",)}


def sample_names(registry) -> set[str]:
    return {f.name + s for f in registry.collect() for s in SUFFIXES[f.type]}


@cache
def exported() -> dict[str, frozenset[str]]:
    """Sample names per `vigil` command, from the registries the services build."""
    from alerting.cli import DEFAULT_CONFIG, DEFAULT_RULES
    from alerting.core import core_from_files
    from eventbus.metrics import PublisherMetrics
    from inference.edge.metrics import ServerMetrics
    from rollout.service import Metrics as RolloutMetrics
    from stream_processors.runner import Metrics as ProcessorMetrics

    class NoVersions:
        def all(self):
            return []

    inference = ServerMetrics(NoVersions())
    PublisherMetrics(inference.registry)  # inference/api/server.py puts its publisher's metrics there
    return {"serve": frozenset(sample_names(inference.registry)),
            "process": frozenset(sample_names(ProcessorMetrics().registry)),
            "alerting": frozenset(sample_names(core_from_files([DEFAULT_RULES], DEFAULT_CONFIG).registry)),
            "rollout": frozenset(sample_names(RolloutMetrics().registry))}


def rule_groups() -> list[dict]:
    return yaml.safe_load((ROOT / "deploy/prometheus-rules.yml").read_text())["groups"]


def known_metrics() -> set[str]:
    """What Prometheus holds here: every service's samples, `up`, and the recording rules."""
    records = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    return set().union(*exported().values()) | {"up"} | records


KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (no parser at hand: strings, label matchers,
    ranges and grouping clauses are cut away; what is left and is not a function is a name)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if not e[m.end():].lstrip().startswith("(") and m.group().lower() not in KEYWORDS:
            names.add(m.group())
    return names


def test_promql_metrics_finds_the_names():
    assert promql_metrics('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{x="b c"}[5m]))) > 1e3') == \
        {"a_bucket"}
    assert promql_metrics("sum(rate(x_total[1m])) by (status) / on (m) group_left (v) y + up offset 5m") == \
        {"x_total", "y", "up"}
    assert promql_metrics('max by (model) (vigil:ratio{a=~"$model"}) == bool 1') == {"vigil:ratio"}


def test_the_rules_name_only_metrics_the_services_export():
    known, jobs = known_metrics(), scrape_jobs()
    for group in rule_groups():
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            missing = promql_metrics(rule["expr"]) - known
            assert not missing, f"{name} asks for {sorted(missing)}, which no service exports"
            for job in re.findall(r'job="([^"]+)"', rule["expr"]):
                assert job in jobs, f"{name}: Prometheus has no job {job}"


def test_alertmanager_inhibitions_name_real_alerts():
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    config = yaml.safe_load((ROOT / "deploy/alertmanager.yml").read_text())
    for rule in config["inhibit_rules"]:
        for matcher in rule.get("source_matchers", []) + rule.get("target_matchers", []):
            if m := re.fullmatch(r'alertname=~?"(.+)"', matcher):
                names = m.group(1).split("|")
                assert set(names) <= alerts, f"{matcher}: {sorted(set(names) - alerts)} are not alerts"


# ---- Grafana ---------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((DASHBOARDS / "vigil.json").read_text())


def panels(d: dict):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def queries(d: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels(d) for t in p.get("targets", [])]
    for v in d.get("templating", {}).get("list", []):
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            if m := re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", q):
                q = m.group(1)
            out.append((f"variable {v['name']}", q))
    return out


def grafana_yaml(kind: str) -> list[dict]:
    files = sorted((PROVISIONING / kind).glob("*.yml")) + sorted((PROVISIONING / kind).glob("*.yaml"))
    assert files, f"no {kind} provisioning file"
    docs = [yaml.safe_load(f.read_text()) for f in files]
    for f, doc in zip(files, docs):
        assert isinstance(doc, dict) and doc.get("apiVersion") == 1, f"{f}: apiVersion 1"
    return docs


def datasources() -> list[dict]:
    return [ds for doc in grafana_yaml("datasources") for ds in doc["datasources"]]


def datasource_refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def test_the_dashboard_has_the_panels_the_issue_asks_for():
    d = dashboard()
    by_title = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in panels(d)}

    def panel(pattern: str) -> list[str]:
        found = [t for t in by_title if re.search(pattern, t, re.I)]
        assert len(found) == 1, f"one panel titled like {pattern!r}, found {found}"
        return by_title[found[0]]

    traffic = panel(r"^traffic per version")
    assert any("vigil_requests_total" in promql_metrics(e) and "rate(" in e
               and re.search(r"by \([^)]*\bversion\b", e) for e in traffic)
    latency = panel(r"^end-to-end latency")
    for q in ("0.5", "0.95", "0.99"):
        assert any(re.search(rf"histogram_quantile\(\s*{q}\s*,", e) and "_bucket" in e for e in latency), q
    drift = panel(r"drift statistic")
    assert any(re.search(r'detector=~?"[^"]*\b(ks|psi)\b', e) for e in drift)
    ece = panel(r"\bECE\b")
    assert any('detector="ece"' in e for e in ece)
    phase = panel(r"rollout phase")
    assert any(re.search(r"\bphase\b", e) for e in phase)


def test_the_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        assert p["type"] == "row" or refs, f"{p['title']} shows nothing"
    uids = [json.loads(f.read_text())["uid"] for f in DASHBOARDS.glob("*.json")]
    assert len(uids) == len(set(uids))


def test_the_dashboard_uses_the_provisioned_datasource():
    provisioned = {ds["uid"]: ds for ds in datasources()}
    refs = list(datasource_refs(dashboard()))
    assert refs
    for ref in refs:
        assert ref.get("uid") in provisioned, f"data source {ref} is not provisioned"
        assert ref.get("type") == provisioned[ref["uid"]]["type"]


def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each query, with Grafana's variables given values, as a recording rule: promtool
    checks its syntax."""
    rules = []
    for i, (where, expr) in enumerate(queries(dashboard())):
        e = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
        e = re.sub(r"\$\{?\w+\}?", ".*", e)
        rules.append({"record": f"dashboard:query_{i}", "expr": e, "labels": {"where": where}})
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([require_tool("promtool"), "check", "rules", "dashboard-rules.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_metrics() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for where, expr in queries(dashboard()):
        for name in promql_metrics(expr):
            used.setdefault(name, set()).add(where)
    return used


def test_every_metric_the_dashboard_queries_is_exported():
    used, known = dashboard_metrics(), known_metrics()
    missing = {name: sorted(where) for name, where in used.items() if name not in known}
    assert not missing, f"the dashboard queries metrics no service exports: {missing}"


def test_grafana_provisioning_matches_the_compose_mounts():
    grafana = SERVICES["grafana"]
    # the provisioning folder, at Grafana's default provisioning path
    assert repo_path(grafana, "/etc/grafana/provisioning") == PROVISIONING
    # the data source is the compose Prometheus, at the port it listens on
    (ds,) = [ds for ds in datasources() if ds["type"] == "prometheus"]
    assert ds["url"] == f"http://prometheus:{next(iter(container_ports(SERVICES['prometheus'])))}"
    assert ds.get("isDefault") is True and ds["access"] == "proxy"
    assert ds["jsonData"]["timeInterval"] == prometheus_config()["global"]["scrape_interval"]
    # the dashboards provider reads the folder the dashboards are mounted at
    providers = [p for doc in grafana_yaml("dashboards") for p in doc["providers"]]
    assert providers and all(p["type"] == "file" for p in providers)
    folders = {repo_path(grafana, p["options"]["path"]) for p in providers}
    assert DASHBOARDS in folders, f"no provider reads {DASHBOARDS}: {folders}"
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or repo_path(grafana, home) == DASHBOARDS / "vigil.json"
    assert "prometheus" in grafana.get("depends_on", [])
