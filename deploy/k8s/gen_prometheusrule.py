"""Writes base/prometheusrule.yaml from deploy/prometheus/alerts.yml (the same rules for the
prometheus-operator). Run after changing the alerts: python deploy/k8s/gen_prometheusrule.py
(tests/unit/test_k8s_manifests.py fails while they differ)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
       "metadata": {"name": "clickpulse", "labels": {"app.kubernetes.io/part-of": "clickpulse"}},
       "spec": {"groups": rules["groups"]}}
header = ("# Generated from deploy/prometheus/alerts.yml by deploy/k8s/gen_prometheusrule.py: edit the alerts\n"
          "# there (they are unit-tested with promtool) and re-run it. Your Prometheus resource must select\n"
          "# it (ruleSelector; with kube-prometheus-stack, e.g. the label release: <your release name>).\n")


class _Literal(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Literal.add_representer(str, _str)
(Path(__file__).parent / "base" / "prometheusrule.yaml").write_text(
    header + yaml.dump(doc, Dumper=_Literal, sort_keys=False, width=120, allow_unicode=True))
