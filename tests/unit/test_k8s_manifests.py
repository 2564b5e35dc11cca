"""deploy/k8s validated offline: core kinds against the Kubernetes OpenAPI schemas shipped by
``kubernetes-validate`` (strict: unknown fields are errors), Strimzi and prometheus-operator kinds
against their CRDs' own OpenAPI schemas (vendored in deploy/k8s/crds, unknown fields are errors
too), and the manifests consistent with each other and with the code (topics, settings, ports,
rules, alerts)."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from clickpulse.settings import ENV_VARS, Settings
from clickpulse.topics import topic_specs

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
CRDS = K8S / "crds"

#: Kubernetes versions the core manifests are checked against (the oldest supported one and the
#: newest kubernetes-validate ships)
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())



def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def manifests() -> list[dict[str, Any]]:
    """Every resource the kustomization applies."""
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [d for f in kust["resources"] for d in docs(BASE / f)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    [d] = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return d


# --- schemas ------------------------------------------------------------------------------------
def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as ``kubectl apply --validate=strict`` does:
    an object schema listing ``properties`` gets ``additionalProperties: false`` unless it keeps
    unknown fields (``x-kubernetes-preserve-unknown-fields``) or sets additionalProperties."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind) -> JSON schema`` of every served version of the vendored CRDs."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in docs(path):
            assert crd["kind"] == "CustomResourceDefinition", path
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v.get("served"):
                    schema = _closed(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
                    # apiVersion/kind/metadata are the API server's; the CRD leaves metadata open
                    schema["properties"]["metadata"] = {"type": "object"}
                    out[(f"{group}/{v['name']}", kind)] = schema
    return out


CRD_SCHEMAS = crd_schemas()


def validate(doc: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` (or kubernetes-validate's) when ``doc`` is invalid."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft202012Validator(CRD_SCHEMAS[key]).validate(doc)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_vendored_crds_are_unmodified() -> None:
    readme = (CRDS / "README.md").read_text()
    sums = dict(reversed(m) for m in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M))
    files = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert sorted(sums) == files
    for name in files:
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == sums[name], name
    assert {k for _v, k in CRD_SCHEMAS} == {"Kafka", "KafkaNodePool", "KafkaTopic", "PodMonitor", "PrometheusRule"}


def test_names_are_kubernetes_names() -> None:
    """DNS-1123 subdomains (a KafkaTopic's Kafka name may differ: spec.topicName); labels too."""
    name_re = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    for d in manifests():
        assert name_re.match(d["metadata"]["name"]) and len(d["metadata"]["name"]) <= 253, d["metadata"]["name"]
        for v in d["metadata"].get("labels", {}).values():
            assert re.match(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61}[A-Za-z0-9]|[A-Za-z0-9]?)$", v), v


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kust["resources"]) == files
    assert kust["namespace"] == "clickpulse"


@pytest.mark.parametrize("doc", manifests() + docs(BASE / "secret.example.yaml"),
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid(doc: dict[str, Any]) -> None:
    validate(doc)


@pytest.mark.parametrize(("kind", "name", "path", "value"), [
    ("StatefulSet", "clickpulse-worker", ["spec", "replicas"], "three"),          # wrong type
    ("StatefulSet", "clickpulse-worker", ["spec", "template", "spec", "containers", 0, "readinesProbe"], {}),  # typo
    ("HorizontalPodAutoscaler", "clickpulse-collector", ["spec", "minReplica"], 2),  # typo
    ("KafkaTopic", "clickpulse.events.raw", ["spec", "partitons"], 12),            # typo in a CRD kind
    ("KafkaTopic", "clickpulse.events.raw", ["spec", "partitions"], "12"),         # wrong type in a CRD kind
    ("Kafka", "clickpulse-kafka", ["spec", "kafka", "listeners", 0, "type"], "public"),  # not in the enum
    ("KafkaNodePool", "dual-role", ["spec", "roles"], ["leader"]),
    ("PodMonitor", "clickpulse", ["spec", "podMetricsEndpoints", 0, "intervall"], "15s"),
    ("PrometheusRule", "clickpulse", ["spec", "groups", 0, "rules", 1, "for"], "fifteen minutes"),
])
def test_invalid_manifests_are_rejected(kind: str, name: str, path: list, value: Any) -> None:
    """The validation can fail: one broken field in a copy of a real manifest is caught."""
    doc = copy.deepcopy(one(kind, name))
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


# --- consistency --------------------------------------------------------------------------------
def settings_env() -> dict[str, str]:
    return one("ConfigMap", "clickpulse-settings")["data"]


def test_settings_configmap_names_real_settings() -> None:
    env = settings_env()
    unknown = set(env) - set(ENV_VARS)
    assert not unknown, f"not clickpulse settings: {unknown}"
    s = Settings.from_env(env)  # parses (types, ranges)
    assert s.namespace == "clickpulse" and s.web_host == "0.0.0.0"


def test_kafka_topics_are_the_codes_topics() -> None:
    """Every topic of clickpulse.topics.topic_specs (names, partitions, configs) for the
    ConfigMap's namespace and partitions, plus Faust's changelog and leader topics."""
    env = settings_env()
    s = Settings.from_env(env)
    want = {name: (spec["partitions"], spec["config"]) for name, spec in topic_specs(s).items()}
    topics = {t["spec"]["topicName"]: t for t in by_kind("KafkaTopic")}
    got = {name: (t["spec"]["partitions"], t["spec"].get("config", {})) for name, t in topics.items()
           if name in want}
    assert got == want
    extra = set(topics) - set(want)
    assert extra == {s.changelog_topic, f"{s.app_id}-__assignor-__leader"}
    assert topics[s.changelog_topic]["spec"]["partitions"] == s.partitions
    assert topics[s.changelog_topic]["spec"]["config"]["cleanup.policy"] == "compact"
    [kafka] = by_kind("Kafka")
    [pool] = by_kind("KafkaNodePool")
    cluster = kafka["metadata"]["name"]
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == cluster
    assert {"controller", "broker"} <= set(pool["spec"]["roles"])  # KRaft, no ZooKeeper
    min_isr = int(kafka["spec"]["kafka"]["config"]["min.insync.replicas"])
    for t in topics.values():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert t["spec"]["replicas"] == s.replication_factor, t["metadata"]["name"]
        assert min_isr < t["spec"]["replicas"] <= pool["spec"]["replicas"], t["metadata"]["name"]
    plain = [lst for lst in kafka["spec"]["kafka"]["listeners"] if not lst["tls"]][0]
    assert s.kafka_bootstrap == f"{cluster}-kafka-bootstrap:{plain['port']}"


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    return one(kind, name)["spec"]["template"]["spec"]


def container(kind: str, name: str) -> dict[str, Any]:
    [c] = pod_spec(kind, name)["containers"]
    return c


def port(c: dict[str, Any], name: str) -> int:
    [p] = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return p


COMPONENTS = [("StatefulSet", "clickpulse-worker", "worker", "web", "CLICKPULSE_WEB_PORT"),
              ("Deployment", "clickpulse-trainer", "trainer", "web", "CLICKPULSE_TRAINER_WEB_PORT"),
              ("Deployment", "clickpulse-collector", "collector", "http", "CLICKPULSE_COLLECTOR_PORT"),
              ("Deployment", "clickpulse-api", "api", "http", "CLICKPULSE_API_PORT")]


@pytest.mark.parametrize(("kind", "name", "command", "port_name", "port_env"), COMPONENTS,
                         ids=[c[1] for c in COMPONENTS])
def test_components(kind: str, name: str, command: str, port_name: str, port_env: str) -> None:
    c = container(kind, name)
    assert c["args"] == ["clickpulse", command]
    assert port(c, port_name) == int(settings_env()[port_env])
    assert {"configMapRef": {"name": "clickpulse-settings"}} in c["envFrom"]
    secret = docs(BASE / "secret.example.yaml")[0]
    for e in c.get("env", []):  # every secret a pod reads is in the documented secret
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], e
        assert e["name"] in ENV_VARS
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # the PodMonitor scrapes it: its labels are selected and its metrics port is an endpoint
    [pm] = by_kind("PodMonitor")
    labels = one(kind, name)["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert port_name in {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}


def test_worker_statefulset() -> None:
    sts = one("StatefulSet", "clickpulse-worker")
    c = container("StatefulSet", "clickpulse-worker")
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"     # 503 while Kafka/Redis fail
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"     # liveness only
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    [claim] = sts["spec"]["volumeClaimTemplates"]
    env = settings_env()
    assert env["CLICKPULSE_DATA_DIR"].startswith(mounts[claim["metadata"]["name"]] + "/")  # state store on the volume
    assert env["CLICKPULSE_RULES_PATH"] == mounts["rules"] + "/rules.yaml"
    [rules_vol] = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "rules"]
    rules = one("ConfigMap", rules_vol["configMap"]["name"])
    assert rules["data"]["rules.yaml"] == (ROOT / "src" / "clickpulse" / "rules" / "default_rules.yaml").read_text()
    assert sts["spec"]["replicas"] <= int(env["CLICKPULSE_PARTITIONS"])  # more would idle
    assert sts["spec"]["serviceName"] == "clickpulse-worker"
    assert one("Service", "clickpulse-worker")["spec"]["clusterIP"] == "None"
    pdb = one("PodDisruptionBudget", "clickpulse-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_single_trainer() -> None:
    trainer = one("Deployment", "clickpulse-trainer")
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"


def test_collector_autoscaled() -> None:
    hpa = one("HorizontalPodAutoscaler", "clickpulse-collector")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "clickpulse-collector")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # CPU utilization is relative to the request: the container must have one
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert container("Deployment", "clickpulse-collector")["resources"]["requests"]["cpu"]


def test_services_select_their_pods() -> None:
    pods = {d["metadata"]["name"]: d for d in manifests() if d["kind"] in ("Deployment", "StatefulSet")}
    for svc in by_kind("Service"):
        target = pods[svc["metadata"]["name"]]
        tmpl = target["spec"]["template"]
        assert svc["spec"]["selector"].items() <= tmpl["metadata"]["labels"].items(), svc["metadata"]["name"]
        assert target["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
        names = {p["name"] for c in tmpl["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, (svc["metadata"]["name"], p)
    env = settings_env()
    redis_svc = one("Service", "clickpulse-redis")
    assert env["CLICKPULSE_REDIS_URL"] == f"redis://{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}/0"


def test_prometheusrule_equals_alerts_yml() -> None:
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    [rule] = by_kind("PrometheusRule")
    assert rule["spec"]["groups"] == alerts["groups"], \
        "deploy/k8s/base/prometheusrule.yaml differs from alerts.yml: run python deploy/k8s/gen_prometheusrule.py"
