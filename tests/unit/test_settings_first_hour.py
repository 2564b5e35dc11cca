"""Settings a new user gets wrong: booleans, typos in variable names, addresses, ports, the
replication settings; and the README's configuration table checked against settings.py (the
source: every variable listed, defaults equal, units stated)."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from clickpulse import settings as settings_mod
from clickpulse.errors import ConfigError
from clickpulse.runtime import REPO_ROOT
from clickpulse.settings import (
    ENV_VARS,
    FALSE_WORDS,
    OTHER_ENV_VARS,
    TRUE_WORDS,
    Settings,
    parse_bool,
    unknown_env_vars,
    warn_unknown_env_vars,
)

FIELDS = {f"CLICKPULSE_{f.name.upper()}": f for f in dataclasses.fields(Settings) if f.name != "extra"}
BOOL_VARS = sorted(n for n, f in FIELDS.items() if isinstance(f.default, bool))


@pytest.mark.parametrize("raw,want", [*((w, True) for w in sorted(TRUE_WORDS)), *((w, False) for w in sorted(FALSE_WORDS)),
                                      ("TRUE", True), (" Yes ", True), ("Off", False), ("FALSE", False)])
def test_booleans_accept_the_usual_spellings(raw, want):
    assert BOOL_VARS  # there are boolean settings to check
    for name in BOOL_VARS:
        assert getattr(Settings.from_env({name: raw}), FIELDS[name].name) is want


@pytest.mark.parametrize("raw", ["ture", "2", "", "y", "enabled", "nope"])
def test_a_bad_boolean_is_refused_not_false(raw):
    for name in BOOL_VARS:
        with pytest.raises(ConfigError, match=f"{name}={raw!r} is not a boolean: use true/false, 1/0, yes/no or on/off"):
            Settings.from_env({name: raw})


def test_parse_bool_names_the_variable():
    with pytest.raises(ConfigError, match="CLICKPULSE_X='maybe'"):
        parse_bool("maybe", "CLICKPULSE_X")


def test_booleans_roundtrip_through_env():
    s = Settings.from_env({"CLICKPULSE_MODELS_ENABLED": "off", "CLICKPULSE_RAW_KEYED": "on"})
    assert (s.models_enabled, s.raw_keyed) == (False, True)
    assert Settings.from_env(s.env()) == s


def test_unknown_variables_get_a_did_you_mean():
    env = {"CLICKPULSE_PARTITONS": "8", "CLICKPULSE_MODELS_ENABLE": "1", "CLICKPULSE_ZZZ_QQQ": "1",
           "CLICKPULSE_PARTITIONS": "4", "CLICKPULSE_KAFKA_PORT": "9092", "CLICKPULSE_DEBUG": "1", "OTHER_VAR": "x"}
    assert unknown_env_vars(env) == [("CLICKPULSE_MODELS_ENABLE", "CLICKPULSE_MODELS_ENABLED"),
                                     ("CLICKPULSE_PARTITONS", "CLICKPULSE_PARTITIONS"),
                                     ("CLICKPULSE_ZZZ_QQQ", None)]


def test_unknown_variables_are_warned_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(settings_mod, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="clickpulse.settings"):
        Settings.from_env({"CLICKPULSE_SESION_GAP_S": "60"})
        Settings.from_env({"CLICKPULSE_SESION_GAP_S": "60"})
    warnings = [r.getMessage() for r in caplog.records if r.name == "clickpulse.settings"]
    assert warnings == ["CLICKPULSE_SESION_GAP_S is not a clickpulse setting and is ignored "
                        "(did you mean CLICKPULSE_SESSION_GAP_S?)"]
    assert warn_unknown_env_vars({"CLICKPULSE_SESION_GAP_S": "1"}) == []  # already said


@pytest.mark.parametrize("url", ["127.0.0.1:6379", "localhost", "http://127.0.0.1:6379", "redis://", "redis://h:port/0",
                                 "unix://"])
def test_redis_url_needs_a_scheme_and_host(url):
    with pytest.raises(ConfigError, match="CLICKPULSE_REDIS_URL"):
        Settings.from_env({"CLICKPULSE_REDIS_URL": url})


@pytest.mark.parametrize("url", ["", "redis://127.0.0.1:6379/0", "rediss://user:pw@cache.example:6380/1",
                                 "redis://[::1]:6379", "unix:///run/redis.sock"])
def test_good_redis_urls(url):
    assert Settings.from_env({"CLICKPULSE_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("bootstrap", ["127.0.0.1", "kafka://127.0.0.1:9092", "h:0", "h:99999", "h:9092,", ":9092"])
def test_bad_bootstrap(bootstrap):
    with pytest.raises(ConfigError, match="CLICKPULSE_KAFKA_BOOTSTRAP must be host:port"):
        Settings.from_env({"CLICKPULSE_KAFKA_BOOTSTRAP": bootstrap})


def test_good_bootstrap():
    assert Settings.from_env({"CLICKPULSE_KAFKA_BOOTSTRAP": "k1:9092, k2:9093"}).kafka_bootstrap == "k1:9092, k2:9093"


@pytest.mark.parametrize("env", [{"CLICKPULSE_WEB_PORT": "0"}, {"CLICKPULSE_TRAINER_WEB_PORT": "65536"},
                                 {"CLICKPULSE_REPLICATION_FACTOR": "0"}, {"CLICKPULSE_STANDBY_REPLICAS": "-1"},
                                 {"CLICKPULSE_REPLICATION_FACTOR": "three"}])
def test_ports_and_replication_ranges(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


def test_replication_settings_reach_the_topics_and_the_faust_app(tmp_path):
    from clickpulse.topics import topic_specs
    s = Settings.from_env({"CLICKPULSE_REPLICATION_FACTOR": "3", "CLICKPULSE_STANDBY_REPLICAS": "1",
                           "CLICKPULSE_PARTITIONS": "12"})
    specs = topic_specs(s)
    assert {spec["replication"] for spec in specs.values()} == {3}
    assert specs[s.topic_raw]["partitions"] == 12 and specs[s.topic_training]["partitions"] == 1
    from clickpulse.app import _app
    app = _app(s.replace(data_dir=str(tmp_path / "test-replication-app")))  # nothing left in the checkout
    assert (app.conf.topic_replication_factor, app.conf.table_standby_replicas, app.conf.topic_partitions) == (3, 1, 12)


# ---- README's configuration table against settings.py ----------------------------------------


def readme_table() -> list[tuple[list[str], list[str], str]]:
    """``(names, defaults, meaning)`` of each row of README's "### Configuration" table."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("### Configuration"):]
    section = section[:section.index("\n### ", 5)]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `CLICKPULSE_"):
            names_cell, default_cell, meaning = [c.strip() for c in line.strip().strip("|").split("|")]
            names = re.findall(r"`(CLICKPULSE_[A-Z0-9_]+)`", names_cell)
            assert names, line
            defaults = [v.strip().strip("`") for v in re.split(r" / |, ", default_cell)]
            rows.append((names, defaults, meaning))
    return rows


def test_readme_lists_every_variable_and_only_those():
    listed = [n for names, _d, _m in readme_table() for n in names]
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    known = set(ENV_VARS) | set(OTHER_ENV_VARS)
    assert sorted(set(ENV_VARS) - set(listed)) == [], "settings missing from README's configuration table"
    assert sorted(set(OTHER_ENV_VARS) - set(listed)) == [], "script variables missing from the table"
    assert sorted(set(listed) - known) == [], "README lists variables no setting reads"


def _same_default(shown: str, default: object) -> bool:
    if isinstance(default, bool):
        return shown.lower() == str(default).lower()
    if isinstance(default, str):
        return shown == default or (default == "" and shown.split()[0] in ("empty", "packaged"))
    return float(shown) == float(default)


def test_readme_defaults_are_the_settings_defaults():
    wrong = []
    for names, defaults, _m in readme_table():
        if len(defaults) == 1:
            defaults = defaults * len(names)
        assert len(defaults) == len(names), (names, defaults)
        for name, shown in zip(names, defaults, strict=True):
            if name in FIELDS and not _same_default(shown, FIELDS[name].default):
                wrong.append(f"{name}: README {shown!r}, settings.py {FIELDS[name].default!r}")
            if name in OTHER_ENV_VARS and shown != OTHER_ENV_VARS[name][0]:
                wrong.append(f"{name}: README {shown!r}, OTHER_ENV_VARS {OTHER_ENV_VARS[name][0]!r}")
    assert not wrong, wrong


UNIT_WORDS = {"_s": "second", "_days": "day", "_bytes": "byte"}


def test_every_setting_with_a_unit_states_it_in_readme_and_docstring():
    doc = Settings.__doc__ or ""
    missing = []
    for names, _d, meaning in readme_table():
        for name in names:
            for suffix, word in UNIT_WORDS.items():
                if name.endswith(suffix.upper()) and word not in meaning.lower():
                    missing.append(f"README {name}: no '{word}'")
    for name, f in FIELDS.items():
        entry = re.search(rf"^    [a-z_, ]*\b{f.name}\b[a-z_, ]* : .*?(?=^    [a-z_]|\Z)", doc, re.M | re.S)
        assert entry, f"Settings docstring documents no {f.name}"
        assert "CLICKPULSE_" in entry.group(0), f.name
        for suffix, word in UNIT_WORDS.items():
            if f.name.endswith(suffix) and word not in entry.group(0).lower():
                missing.append(f"settings.py {f.name}: no '{word}'")
    assert not missing, missing


@pytest.mark.parametrize("name", ["CLICKPULSE_KAFKA_PORT", "CLICKPULSE_REDIS_PORT"])
def test_local_script_ports_are_checked_under_their_own_name(name):
    with pytest.raises(ConfigError, match=f"{name} must be a TCP port in 1..65535, got 'abc'"):
        Settings.from_env({name: "abc"})
