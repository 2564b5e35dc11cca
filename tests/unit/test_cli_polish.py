"""Newcomer-review fixes of the command line: ``rules check`` warns about properties the PII
policy drops; ``topics clean`` needs a namespace; one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from clickpulse.cli import main

RULES = """
version: "x"
triggers:
  - name: hot
    on: product_view
    when: 'has(event.properties.hot) && event.properties.price > 1.0 && event.context["ip"] == "x"'
    action: {type: promo, payload: {p: 'event.properties.colour', q: 'event.properties["category"]'}}
"""


def test_rules_check_warns_for_properties_the_pii_policy_drops(tmp_path: Path, monkeypatch, capsys) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    monkeypatch.delenv("CLICKPULSE_PII_POLICY_PATH", raising=False)
    assert main(["rules", "check", str(rules)]) == 0
    out = capsys.readouterr().out
    warned = {line.split()[1] for line in out.splitlines() if line.strip().startswith("warning: event.")}
    # price and category are in the default policy's allowlist; hot, colour and context.ip are not
    assert warned == {"event.context.ip", "event.properties.colour", "event.properties.hot"}
    assert "add it to properties.allow" in out
    # a policy that allows them: no warning
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nproperties: {allow: [hot, colour, price, category]}\n"
                      "context: {allow: [ip]}\ntraits: {allow: []}\n")
    monkeypatch.setenv("CLICKPULSE_PII_POLICY_PATH", str(policy))
    assert main(["rules", "check", str(rules)]) == 0
    assert "warning: event." not in capsys.readouterr().out


def test_the_default_rules_read_nothing_the_default_policy_drops(monkeypatch, capsys) -> None:
    monkeypatch.delenv("CLICKPULSE_PII_POLICY_PATH", raising=False)
    monkeypatch.delenv("CLICKPULSE_RULES_PATH", raising=False)
    assert main(["rules", "check"]) == 0
    assert "warning" not in capsys.readouterr().out
