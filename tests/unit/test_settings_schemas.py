"""Settings from the environment; the shipped JSON Schemas themselves."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from clickpulse.errors import ConfigError
from clickpulse.events.schemas import SCHEMA_DIR, SCHEMA_NAMES, load_schema
from clickpulse.runtime import REPO_ROOT
from clickpulse.settings import ENV_VARS, Settings


def test_defaults_and_env():
    s = Settings.from_env({})
    assert s.rules_file.endswith("default_rules.yaml") and s.assumed_consent == frozenset() and s.time_mode == "live" and s.partitions == 4
    s = Settings.from_env({"CLICKPULSE_PARTITIONS": "8", "CLICKPULSE_TIME_MODE": "replay",
                           "CLICKPULSE_ALLOWED_LATENESS_S": "2.5"})
    assert (s.partitions, s.time_mode, s.allowed_lateness_ms) == (8, "replay", 2500)


@pytest.mark.parametrize("env", [{"CLICKPULSE_PARTITIONS": "four"}, {"CLICKPULSE_PARTITIONS": "0"},
                                 {"CLICKPULSE_TIME_MODE": "fast"}, {"CLICKPULSE_NAMESPACE": "a b"},
                                 {"CLICKPULSE_ALLOWED_LATENESS_S": "-1"}])
def test_bad_settings_raise_config_error_naming_the_variable(env):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(env)
    assert next(iter(env)) in str(exc.value)


def test_env_roundtrip():
    s = Settings.from_env({"CLICKPULSE_NAMESPACE": "x1", "CLICKPULSE_WEB_PORT": "7000"})
    assert Settings.from_env(s.env()) == s
    assert set(s.env()) == set(ENV_VARS)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schemas_are_valid_draft_2020_12(name):
    Draft202012Validator.check_schema(load_schema(name))


def test_package_schemas_are_the_repo_schemas():
    for name in SCHEMA_NAMES:
        assert (SCHEMA_DIR / f"{name}.v1.json").read_bytes() == (REPO_ROOT / "schemas" / f"{name}.v1.json").read_bytes()


def test_local_service_ports_imply_the_addresses():
    s = Settings.from_env({"CLICKPULSE_KAFKA_PORT": "19092", "CLICKPULSE_REDIS_PORT": "16379"})
    assert s.kafka_bootstrap == "127.0.0.1:19092" and s.redis_url == "redis://127.0.0.1:16379/0"
    s = Settings.from_env({"CLICKPULSE_KAFKA_PORT": "19092", "CLICKPULSE_KAFKA_BOOTSTRAP": "k:9092"})
    assert s.kafka_bootstrap == "k:9092"
