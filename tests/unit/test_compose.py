"""docker-compose.yml stays consistent with the code and the local deploy files.

No Docker, no network: the compose file, the Prometheus configs, the local Kafka scripts and the
Maven pom are parsed as text and compared with :mod:`clickpulse.settings` and
:func:`clickpulse.topics.topic_specs`.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from clickpulse.settings import ENV_VARS, Settings
from clickpulse.topics import topic_specs

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
LOCAL_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus-local.yml"
KAFKA_SH = ROOT / "deploy" / "local" / "kafka.sh"
KAFKA_POM = ROOT / "deploy" / "local" / "kafka-pom.xml"

REQUIRED_SERVICES = ("kafka", "kafka-init", "redis", "worker", "prometheus")


# helpers ------------------------------------------------------------------------------------
def load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), \
        "docker-compose.yml has no 'services' mapping"
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``KEY=VALUE`` list form) as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, sep, value = str(item).partition("=")
            out[key] = value if sep else ""
        return out
    return {str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def worker_env(services: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in service_env(services["worker"]).items() if k.startswith("CLICKPULSE_")}


def shell_commands(script: str) -> list[list[str]]:
    """Split a shell script into simple commands (argv lists) at newlines, ``;``, ``&&``, ``||``."""
    script = script.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        current: list[str] = []
        for tok in lex:
            if tok in (";", "&&", "||", "&", "|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            commands.append(current)
    return commands


def service_script(service: dict[str, Any]) -> str:
    """The shell text a service runs (entrypoint ``sh -c`` + command, string or list form)."""
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is None:
            continue
        parts.extend(value if isinstance(value, list) else [value])
    return "\n".join(str(p) for p in parts)


def option_values(argv: list[str], name: str) -> list[str]:
    """All values of ``--name VALUE`` / ``--name=VALUE`` in ``argv``."""
    values = []
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg[len(name) + 1:])
    return values


def created_topics(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Topic -> {partitions, config, bootstrap, replication} from ``kafka-topics.sh --create`` calls."""
    topics: dict[str, dict[str, Any]] = {}
    for argv in shell_commands(service_script(service)):
        if not argv or not argv[0].endswith("kafka-topics.sh") or "--create" not in argv:
            continue
        names = option_values(argv, "--topic")
        parts = option_values(argv, "--partitions")
        assert len(names) == 1, f"kafka-init: a kafka-topics.sh --create call without exactly one --topic: {argv}"
        assert len(parts) == 1, f"kafka-init: topic {names[0]!r} is created without --partitions: {argv}"
        name = names[0]
        assert name not in topics, f"kafka-init creates topic {name!r} twice"
        config = dict(c.partition("=")[::2] for c in option_values(argv, "--config"))
        topics[name] = {
            "partitions": int(parts[0]),
            "config": config,
            "bootstrap": option_values(argv, "--bootstrap-server"),
            "replication": option_values(argv, "--replication-factor"),
        }
    return topics


def image_tag(service: dict[str, Any]) -> tuple[str, str]:
    image = str(service.get("image", ""))
    repo, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return repo, tag


def prometheus_targets(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(job, target, metrics_path) of every static target."""
    out = []
    for job in config.get("scrape_configs") or []:
        path = job.get("metrics_path", "/metrics")
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                out.append((job.get("job_name", "?"), str(target), path))
    return out


def shell_var(path: Path, name: str, seen: set[Path] | None = None) -> tuple[str, Path] | None:
    """Value of ``NAME=...`` assigned in a shell script or in the files it ``source``s."""
    seen = seen or set()
    if path in seen or not path.is_file():
        return None
    seen.add(path)
    text = path.read_text(encoding="utf-8")
    m = re.search(rf"^\s*(?:export\s+)?{name}=[\"']?([^\"'\s]+)", text, re.MULTILINE)
    if m:
        return m.group(1), path
    # e.g. source "$(dirname "${BASH_SOURCE[0]}")/common.sh": follow sibling scripts
    for src in re.findall(r"^\s*(?:source|\.)\s+.*?([\w.-]+\.sh)\"?\s*$", text, re.MULTILINE):
        found = shell_var(path.parent / src, name, seen)
        if found:
            return found
    return None


# checks -------------------------------------------------------------------------------------
def test_required_services_exist(services: dict[str, Any]) -> None:
    missing = [s for s in REQUIRED_SERVICES if s not in services]
    assert not missing, f"docker-compose.yml lacks services {missing}; has {sorted(services)}"


def test_worker_env_vars_are_settings(services: dict[str, Any]) -> None:
    env = worker_env(services)
    assert env, "the worker service sets no CLICKPULSE_* environment variables"
    unknown = sorted(set(env) - set(ENV_VARS))
    assert not unknown, f"worker env vars {unknown} are not clickpulse settings (ENV_VARS: {list(ENV_VARS)})"
    try:
        settings = Settings.from_env(env)
    except Exception as err:  # noqa: BLE001 - report any conversion/validation error
        pytest.fail(f"worker env {env} does not convert to Settings: {type(err).__name__}: {err}")
    defaults = Settings()
    for key, value in env.items():
        field = key.removeprefix("CLICKPULSE_").lower()
        assert getattr(settings, field) == type(getattr(defaults, field))(value), \
            f"{key}={value!r} became {getattr(settings, field)!r} in Settings"


def test_worker_reaches_kafka_on_an_advertised_listener(services: dict[str, Any]) -> None:
    settings = Settings.from_env(worker_env(services))
    advertised = service_env(services["kafka"]).get("KAFKA_ADVERTISED_LISTENERS", "")
    endpoints = {a.split("://", 1)[-1] for a in advertised.split(",") if a}
    for server in settings.kafka_bootstrap.split(","):
        assert server in endpoints, (f"worker CLICKPULSE_KAFKA_BOOTSTRAP {server!r} is not an advertised "
                                     f"listener of the kafka service ({advertised!r})")
        assert server.split(":")[0] in services, f"worker bootstrap host {server!r} is not a compose service"


def test_kafka_init_creates_exactly_the_app_topics(services: dict[str, Any]) -> None:
    env = worker_env(services)
    settings = Settings.from_env(env)
    expected = topic_specs(settings)
    created = created_topics(services["kafka-init"])
    assert created, "kafka-init runs no 'kafka-topics.sh --create' command"

    missing = sorted(set(expected) - set(created))
    extra = sorted(set(created) - set(expected))
    assert not missing and not extra, (
        f"kafka-init topics differ from topic_specs(Settings.from_env(worker env)): "
        f"missing {missing}, unexpected {extra} (namespace {settings.namespace!r})")
    wrong_parts = {name: (created[name]["partitions"], spec["partitions"])
                   for name, spec in expected.items() if created[name]["partitions"] != spec["partitions"]}
    assert not wrong_parts, f"partition counts differ, topic: (kafka-init, topic_specs): {wrong_parts}"
    # ensure_topics() leaves existing topics alone, so the configs set here are the ones that stick
    wrong_cfg = {name: (created[name]["config"], spec["config"])
                 for name, spec in expected.items() if created[name]["config"] != spec["config"]}
    assert not wrong_cfg, f"topic configs differ, topic: (kafka-init, topic_specs): {wrong_cfg}"
    for name, t in created.items():
        assert t["bootstrap"] == [settings.kafka_bootstrap], \
            f"kafka-init creates {name!r} on {t['bootstrap']}, the worker uses {settings.kafka_bootstrap!r}"
        assert t["replication"] == ["1"], f"kafka-init: {name!r} needs --replication-factor 1 on a single broker"


def test_worker_waits_for_kafka_init_and_kafka(services: dict[str, Any]) -> None:
    deps = services["worker"].get("depends_on") or {}
    assert isinstance(deps, dict), "worker depends_on must use the long form with conditions"
    want = {"kafka": "service_healthy", "kafka-init": "service_completed_successfully"}
    for name, condition in want.items():
        got = (deps.get(name) or {}).get("condition")
        assert got == condition, f"worker depends_on {name}: condition {got!r}, expected {condition!r}"
    assert "redis" in deps, "worker does not depend on redis"
    assert "healthcheck" in services["kafka"], "kafka has no healthcheck (worker waits for service_healthy)"


def prometheus_config_path(services: dict[str, Any]) -> Path:
    for vol in services["prometheus"].get("volumes") or []:
        src, _, rest = str(vol).partition(":")
        if rest.split(":")[0] == "/etc/prometheus/prometheus.yml":
            return (ROOT / src).resolve()
    pytest.fail("the prometheus service does not mount a file at /etc/prometheus/prometheus.yml")


def test_prometheus_scrapes_the_worker_port(services: dict[str, Any]) -> None:
    path = prometheus_config_path(services)
    assert path == (ROOT / "deploy" / "prometheus" / "prometheus.yml").resolve(), \
        f"prometheus mounts {path}, expected deploy/prometheus/prometheus.yml"
    settings = Settings.from_env(worker_env(services))
    targets = [t for t in prometheus_targets(load_yaml(path)) if t[1].split(":")[0] == "worker"]
    assert targets, f"{path.name} has no scrape target on host 'worker'"
    for job, target, metrics_path in targets:
        port = int(target.rsplit(":", 1)[1]) if ":" in target else 80
        assert port == settings.web_port, (f"prometheus job {job!r} scrapes {target}, the worker serves on "
                                           f"CLICKPULSE_WEB_PORT={settings.web_port}")
        assert metrics_path == "/metrics", f"prometheus job {job!r} uses metrics_path {metrics_path!r}"
    assert settings.web_host == "0.0.0.0", \
        f"worker CLICKPULSE_WEB_HOST={settings.web_host!r}: other containers cannot reach it (use 0.0.0.0)"
    published = [str(p) for p in services["worker"].get("ports") or []]
    for p in published:
        assert p.rsplit(":", 1)[-1].split("/")[0] == str(settings.web_port), \
            f"worker publishes {p!r}, its web port is {settings.web_port}"


def test_local_prometheus_scrapes_the_default_worker() -> None:
    defaults = Settings()
    targets = prometheus_targets(load_yaml(LOCAL_PROMETHEUS))
    want = f"{defaults.web_host}:{defaults.web_port}"
    assert any(t == want and p == "/metrics" for _j, t, p in targets), \
        f"{LOCAL_PROMETHEUS.name} scrapes {[(t, p) for _j, t, p in targets]}, expected {want}/metrics"


def test_kafka_versions_agree(services: dict[str, Any]) -> None:
    repo, tag = image_tag(services["kafka"])
    assert repo == "apache/kafka", f"kafka service image is {services['kafka'].get('image')!r}, expected apache/kafka"
    assert services["kafka-init"].get("image") == services["kafka"].get("image"), \
        f"kafka-init image {services['kafka-init'].get('image')!r} != kafka image {services['kafka'].get('image')!r}"

    found = shell_var(KAFKA_SH, "KAFKA_VERSION")
    assert found, f"KAFKA_VERSION is not assigned in {KAFKA_SH.name} or the files it sources"
    script_version, where = found
    assert tag == script_version, (f"kafka image tag {tag!r} != KAFKA_VERSION={script_version!r} "
                                   f"({where.relative_to(ROOT)}, used by {KAFKA_SH.name})")

    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(KAFKA_POM).getroot().find("m:properties/m:kafka.version", ns)
    assert node is not None and node.text, f"{KAFKA_POM.name} has no <kafka.version> property"
    pom_version = node.text.strip()
    assert tag == pom_version, f"kafka image tag {tag!r} != kafka.version {pom_version!r} in {KAFKA_POM.name}"


def test_worker_image_runs_the_worker(services: dict[str, Any]) -> None:
    build = services["worker"].get("build")
    assert build, "the worker service has no build section"
    dockerfile = ROOT / (build.get("context", ".") if isinstance(build, dict) else build) / (
        build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
    text = dockerfile.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE), \
        f"{dockerfile.name}: base is not python:3.11-slim"
    assert re.search(r'^CMD \["clickpulse", "worker"\]', text, re.MULTILINE), \
        f"{dockerfile.name}: CMD is not clickpulse worker"
    # src/clickpulse/schemas is a symlink into the top-level schemas/ folder
    if (ROOT / "src" / "clickpulse" / "schemas").is_symlink():
        assert re.search(r"^COPY (\./)?schemas\b", text, re.MULTILINE) or re.search(r"^COPY \. ", text, re.MULTILINE), \
            f"{dockerfile.name} does not copy schemas/ (target of the src/clickpulse/schemas symlink)"
