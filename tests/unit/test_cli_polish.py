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


def test_deliver_says_where_it_delivers(tmp_path: Path, monkeypatch, capsys) -> None:
    import clickpulse.delivery as delivery
    from clickpulse.settings import Settings

    async def no_run(*_a, **_k) -> None:
        return None
    monkeypatch.setattr(delivery, "run", no_run)
    s = Settings(namespace="shop")
    assert delivery.run_cli("jsonl", out=str(tmp_path / "a.jsonl"), url=None, metrics_port=None, settings=s) == 0
    assert capsys.readouterr().out == f"delivering shop.actions to jsonl {tmp_path / 'a.jsonl'} (group shop-delivery)\n"
    delivery.run_cli("webhook", out=None, url="https://user:secret@hooks.example.com:8443/in?token=t", metrics_port=None,
                     settings=s)
    out = capsys.readouterr().out
    assert out == "delivering shop.actions to webhook https://hooks.example.com:8443/in (group shop-delivery)\n"
    assert "secret" not in out and "token" not in out


def test_api_says_where_it_listens(monkeypatch, capsys) -> None:
    import clickpulse.serving.api as api
    from clickpulse.settings import Settings

    seen = {}
    monkeypatch.setattr(api.web, "run_app", lambda app, **kw: seen.update(kw))
    api.run(Settings(namespace="shop", api_keys="k" * 20), host="127.0.0.1", port=6123)
    assert capsys.readouterr().out == "clickpulse api listening on http://127.0.0.1:6123 (namespace shop)\n"
    assert seen["port"] == 6123


def test_replay_of_a_file_that_is_not_jsonl_warns_or_refuses(monkeypatch, tmp_path: Path, capsys) -> None:
    import clickpulse.cli as cli
    from clickpulse.ingest.replay import ReplayResult

    sent: list[int] = []

    async def fake_publish(_bootstrap, _topic, records, **_kw):
        n = sum(1 for _ in records)
        sent.append(n)
        return ReplayResult(n, None, None, 0.1, False)

    async def no_topics(_s):
        return None
    monkeypatch.setattr(cli, "publish", fake_publish)
    monkeypatch.setattr(cli, "ensure_topics", no_topics)
    f = tmp_path / "README.md"
    f.write_text('# title\n\n{"type":"page_view","user_id":"u1","timestamp":1569888000000}\n[1]\ntext\n')
    assert main(["replay", "--format", "jsonl", str(f), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert sent == [4] and "warning: 3 of 4 lines of" in err and "(the first: line 1)" in err and "--strict" in err
    assert main(["replay", "--format", "jsonl", str(f), "--quiet", "--strict"]) == 2
    err = capsys.readouterr().err
    assert sent == [4] and err.count("\n") == 1 and "line 1 (non-empty lines counted) is not a JSON object" in err
    good = tmp_path / "e.jsonl"
    good.write_text('{"type":"page_view","user_id":"u1","timestamp":1569888000000}\n')
    assert main(["replay", "--format", "jsonl", str(good), "--quiet", "--strict"]) == 0
    assert capsys.readouterr().err == "" and sent == [4, 1]
