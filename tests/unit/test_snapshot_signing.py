"""Model snapshots are signed: a worker (or the resuming trainer) never unpickles a snapshot whose
HMAC does not verify, counts and logs the rejection, and keeps serving its current model."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import random
import threading
import zlib
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from clickpulse.errors import ConfigError
from clickpulse.events.schemas import validation_errors
from clickpulse.models import online, registry
from clickpulse.models import trainer as trainer_module
from clickpulse.models.online import OnlineModel, safe_loads
from clickpulse.models.registry import (KEY_FILE, ModelRegistry, key_id, parse_key, sign_snapshot, snapshot_key,
                                        verify_snapshot)
from clickpulse.models.trainer import Trainer, _newer_snapshot
from clickpulse.observability.metrics import Metrics
from clickpulse.settings import Settings

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PIPES = {"intent": "logreg", "churn": "logreg"}
PROBES = [{"a": v} for v in (-2.0, -0.5, 0.0, 0.7, 1.5)]
MARKER = "pwned.txt"


def _write_file(path: str) -> OnlineModel:
    """What a malicious pickle runs on load: writes a file (and returns something plausible)."""
    Path(path).write_text("code ran")
    return OnlineModel("intent")


class Evil:
    """Unpickling this calls :func:`_write_file`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return _write_file, (self.path,)


class EvilExec:
    """Unpickling this runs ``exec`` of source that writes a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('code ran')",)


def examples(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = rng.random() < 0.3
        out.append({"task": "intent" if i % 3 else "churn", "x": {"a": rng.gauss(1.0 if y else -1.0, 1.0)}, "y": y})
    return out


def aux_examples(n: int) -> list[dict]:
    rng = random.Random(3)
    out = []
    for i in range(n):
        if i % 2:
            e = rng.uniform(0, 4)
            out.append({"task": "tiers", "x": {"events": e, "duration": e, "add_to_cart": 0.0, "engagement": e}})
        else:
            bought = ["purchase"] if rng.random() < 0.4 else []
            out.append({"task": "markov", "path": ["page_view", "add_to_cart", *bought]})
    return out


def trained(n: int = 300, key: bytes = KEY, aux: bool = False) -> Trainer:
    t = Trainer(PIPES, {}, key=key, tiers_warmup=6)
    exs = examples(n) + (aux_examples(60) if aux else [])
    for off, ex in enumerate(exs):
        t.learn(ex, off)
    return t


def by_task(snaps: list[dict]) -> dict[str, dict]:
    return {s["task"]: s for s in snaps}


def wire(env: dict) -> dict:
    """The envelope as a worker reads it from the topic."""
    return orjson.loads(orjson.dumps(env))


def resign(env: dict, key: bytes = KEY, **changes) -> dict:
    """A copy of ``env`` with ``changes``, validly signed under ``key``."""
    out = {k: v for k, v in wire(env).items() if k not in ("signature", "key_id", "signature_alg")}
    out.update(changes)
    return sign_snapshot(out, key)


def flip_model_byte(env: dict, field: str = "model_b64") -> dict:
    data = bytearray(base64.b64decode(env[field]))
    data[len(data) // 2] ^= 0x01
    return {**wire(env), field: base64.b64encode(bytes(data)).decode()}


def malicious_b64(obj: object) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickling path of the snapshot code records its call; ``pickle.loads`` fails the test."""
    calls: list[int] = []
    real = online.safe_loads

    def spy(data, expected):
        calls.append(len(data))
        return real(data, expected)

    def forbidden(*a, **k):
        raise AssertionError("pickle.loads called on snapshot bytes")

    monkeypatch.setattr(online, "safe_loads", spy)
    monkeypatch.setattr(registry, "safe_loads", spy)
    monkeypatch.setattr(trainer_module, "safe_loads", spy)
    monkeypatch.setattr(pickle, "loads", forbidden)
    return calls


def scores(reg: ModelRegistry) -> list[float]:
    return [reg.score(task, x)[0] for task in ("intent", "churn") for x in PROBES]


def rejected_metric(m: Metrics, reason: str) -> float:
    return m.registry.get_sample_value("clickpulse_model_snapshots_rejected_total", {"reason": reason}) or 0.0


# the worker ----------------------------------------------------------------------------------
def test_signed_snapshots_install_and_match_the_schema():
    t = trained(aux=True)
    snaps = by_task(t.snapshots())
    reg = ModelRegistry(PIPES, key=KEY)
    for s in snaps.values():
        assert s["signature_alg"] == "hmac-sha256" and s["key_id"] == key_id(KEY) and len(s["signature"]) == 64
        assert validation_errors("snapshot", s) == []
        assert reg.install(wire(s)), s["task"]
    assert reg.snapshot_versions == {"intent": 1, "churn": 1, "tiers": 1, "markov": 1}
    assert scores(reg) == [t.models[task].score(x) for task in ("intent", "churn") for x in PROBES]
    assert reg.p_purchase(["add_to_cart"]) == t.aux["markov"].p_purchase(["add_to_cart"])
    assert not reg.rejected


def test_the_signature_covers_the_wire_form_of_nan_metrics():
    t = trained(50)
    env = by_task(t.snapshots())["intent"]
    env = resign(env, metrics={**env["metrics"], "odd": float("nan")})   # orjson writes NaN as null
    assert env["metrics"]["odd"] != env["metrics"]["odd"]
    verify_snapshot(wire(env), KEY)
    assert ModelRegistry(PIPES, key=KEY).install(wire(env))


def tampered(v1: dict, v2: dict, tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """Name -> (snapshot, expected reason); v2 is a genuine newer snapshot of the same task."""
    evil = malicious_b64(Evil(tmp_path / MARKER))
    evil_exec = malicious_b64(EvilExec(tmp_path / MARKER))
    unsigned = {k: v for k, v in wire(v2).items() if k != "signature"}
    return {
        "flipped model byte": (flip_model_byte(v2), "bad_signature"),
        "changed version": ({**wire(v2), "version": 99}, "bad_signature"),
        "changed examples": ({**wire(v2), "examples": v2["examples"] + 1}, "bad_signature"),
        "changed pipeline": ({**wire(v2), "pipeline": "arf"}, "bad_signature"),
        "changed metrics": ({**wire(v2), "metrics": {**v2["metrics"], "n": 1}}, "bad_signature"),
        "added field": ({**wire(v2), "extra": 1}, "bad_signature"),
        "removed field": ({k: v for k, v in wire(v2).items() if k != "positives"}, "bad_signature"),
        "another snapshot's signature": ({**wire(v2), "signature": v1["signature"]}, "bad_signature"),
        "wrong key": (resign(v2, OTHER_KEY), "key_mismatch"),
        "wrong key, our key id": ({**resign(v2, OTHER_KEY), "key_id": key_id(KEY)}, "bad_signature"),
        "missing signature": (unsigned, "unsigned"),
        "null signature": ({**wire(v2), "signature": None}, "unsigned"),
        "no signature fields (old trainer)": ({k: v for k, v in unsigned.items()
                                              if k not in ("key_id", "signature_alg")}, "unsigned"),
        "other algorithm": ({**wire(v2), "signature_alg": "none"}, "malformed"),
        "signature not a string": ({**wire(v2), "signature": 5}, "malformed"),
        "not an object": ([wire(v2)], "malformed"),
        "malicious pickle, unsigned": ({**unsigned, "version": 50, "model_b64": evil}, "unsigned"),
        "malicious pickle, old signature": ({**wire(v2), "version": 50, "model_b64": evil}, "bad_signature"),
        "malicious exec pickle, old signature": ({**wire(v2), "model_b64": evil_exec}, "bad_signature"),
        "malicious pickle, wrong key": (resign(v2, OTHER_KEY, model_b64=evil), "key_mismatch"),
    }


def test_tampered_snapshots_are_rejected_counted_and_never_unpickled(tmp_path, no_unpickling, caplog):
    t = trained(300)
    v1 = by_task(t.snapshots())["intent"]
    v2 = by_task(t.snapshots())["intent"]   # same model, version 2
    m = Metrics(CollectorRegistry())
    reg = ModelRegistry(PIPES, key=KEY, metrics=m)
    assert reg.install(wire(v1))
    loads_after_v1 = len(no_unpickling)
    before = scores(reg)
    cases = tampered(v1, v2, tmp_path)
    caplog.set_level(logging.DEBUG, logger="clickpulse.models.registry")
    for name, (env, reason) in cases.items():
        assert not reg.install(env), name
        assert not (tmp_path / MARKER).exists(), f"{name}: the pickle ran"
        assert len(no_unpickling) == loads_after_v1, f"{name}: unpickled before the signature was checked"
        assert reg.snapshot_versions["intent"] == 1 and scores(reg) == before, name
    want: dict[str, int] = {}
    for _env, reason in cases.values():
        want[reason] = want.get(reason, 0) + 1
    assert dict(reg.rejected) == want
    for reason, n in want.items():
        assert rejected_metric(m, reason) == n
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "rejected a model snapshot" in r.message]
    assert sorted(r.message.split("): ")[1].split(":")[0] for r in warnings) == sorted(want)   # once per reason
    assert all("code ran" not in r.message for r in caplog.records)
    # the genuine newer snapshot still installs after all that
    assert reg.install(wire(v2)) and reg.snapshot_versions["intent"] == 2


def test_a_malicious_pickle_signed_with_the_real_key_is_still_not_run(tmp_path):
    """Second line of defence (a leaked key, a compromised trainer): the allow-list unpickler."""
    t = trained(100)
    v1 = by_task(t.snapshots())["intent"]
    reg = ModelRegistry(PIPES, key=KEY)
    assert reg.install(wire(v1))
    before = scores(reg)
    for evil in (Evil(tmp_path / MARKER), EvilExec(tmp_path / MARKER)):
        env = resign(v1, version=v1["version"] + 1, model_b64=malicious_b64(evil))
        assert not reg.install(env)
        assert not (tmp_path / MARKER).exists()
    assert reg.rejected == {"invalid_model": 2} and scores(reg) == before


def test_unknown_task_and_older_versions_are_rejected():
    t = trained(100, aux=True)
    v1 = by_task(t.snapshots())
    v2 = by_task(t.snapshots())
    reg = ModelRegistry(PIPES, key=KEY)
    for task in ("intent", "tiers"):
        assert reg.install(wire(v2[task]))
        assert not reg.install(wire(v1[task]))                       # older
        assert not reg.install(wire(v2[task]))                       # same
    assert not reg.install(resign(v2["intent"], task="fraud"))
    assert not reg.install(resign(v2["intent"], version=0))
    assert reg.rejected == {"stale": 5, "unknown_task": 1}
    assert reg.snapshot_versions == {"intent": 2, "tiers": 2}


def test_a_registry_without_a_usable_key_installs_nothing(tmp_path, monkeypatch):
    key_path = tmp_path / KEY_FILE
    key_path.write_text("ab" * 32)
    key_path.chmod(0o644)                                            # readable by others: refused
    monkeypatch.setenv("CLICKPULSE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CLICKPULSE_SNAPSHOT_KEY", raising=False)
    reg = ModelRegistry(PIPES)
    env = by_task(trained(30, key=bytes.fromhex("ab" * 32)).snapshots())["intent"]
    assert not reg.install(wire(env)) and reg.rejected == {"no_key": 1}


def test_the_default_key_comes_from_the_worker_environment(tmp_path, monkeypatch):
    """No key passed (how the app builds its registry): the process settings' key, here the key
    file in CLICKPULSE_DATA_DIR shared with a trainer started from the same data dir."""
    monkeypatch.setenv("CLICKPULSE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CLICKPULSE_SNAPSHOT_KEY", raising=False)
    trainer_key = snapshot_key(Settings(data_dir=str(tmp_path)))
    env = by_task(trained(30, key=trainer_key).snapshots())["intent"]
    assert ModelRegistry(PIPES).install(wire(env))
    monkeypatch.setenv("CLICKPULSE_SNAPSHOT_KEY", "x" * 20)           # an explicit key wins over the file
    reg = ModelRegistry(PIPES)
    assert not reg.install(wire(env)) and reg.rejected == {"key_mismatch": 1}


# the trainer ---------------------------------------------------------------------------------
def test_the_trainer_resumes_only_from_valid_snapshots(tmp_path, no_unpickling):
    src = trained(300, aux=True)
    snaps = by_task(src.snapshots())
    fresh = Trainer(PIPES, {}, key=KEY)
    rejected = []
    fresh.rejections.on_reject = rejected.append
    bad = [flip_model_byte(snaps["intent"]), flip_model_byte(snaps["churn"], "validation_b64"),
           {**wire(snaps["intent"]), "training_offset": 10_000}, resign(snaps["markov"], OTHER_KEY),
           {k: v for k, v in wire(snaps["tiers"]).items() if k != "signature"},
           {**wire(snaps["intent"]), "model_b64": malicious_b64(Evil(tmp_path / MARKER))}]
    for env in bad:
        assert not fresh.resume(env)
    assert not (tmp_path / MARKER).exists() and no_unpickling == []
    assert sorted(rejected) == ["bad_signature"] * 4 + ["key_mismatch", "unsigned"]
    assert fresh.versions == {"intent": 0, "churn": 0} and fresh.start_offset() == 0
    for env in snaps.values():
        assert fresh.resume(wire(env))
    assert fresh.versions == src.versions and fresh.start_offset() == src.start_offset()
    assert fresh.validation["intent"].n == src.validation["intent"].n


def test_the_trainer_does_not_run_a_validation_pickle_signed_with_its_key(tmp_path):
    src = trained(100)
    env = by_task(src.snapshots())["intent"]
    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil(tmp_path / MARKER)))).decode()
    fresh = Trainer(PIPES, {}, key=KEY)
    assert not fresh.resume(resign(env, validation_b64=evil))
    assert not (tmp_path / MARKER).exists()
    assert fresh.rejections.counts == {"invalid_model": 1} and fresh.versions["intent"] == 0
    assert fresh.models["intent"].examples == 0                      # nothing half-resumed


def test_latest_snapshot_ignores_forged_newer_versions():
    t = trained(60)
    real = by_task(t.snapshots())["intent"]
    forged = {**wire(real), "version": 10**6}
    out: dict = {}
    assert _newer_snapshot(orjson.dumps(real), out, KEY) is not None
    assert _newer_snapshot(orjson.dumps(forged), out, KEY) is None
    assert _newer_snapshot(b"not json", out, KEY) is None and _newer_snapshot(b'{"a": 1}', out, None) is None
    assert out["intent"]["version"] == real["version"]
    assert _newer_snapshot(orjson.dumps(forged), out, None) is not None   # without a key: display only


def test_a_trainer_needs_a_key():
    with pytest.raises(TypeError):
        Trainer(PIPES, {})   # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Trainer(PIPES, {}, key=b"")


# keys ----------------------------------------------------------------------------------------
def test_key_values():
    assert parse_key("00" * 16) == bytes(16) and parse_key(" " + "ab" * 32 + "\n") == b"\xab" * 32
    assert parse_key("correct horse battery staple") == b"correct horse battery staple"
    assert parse_key("0" * 33) == b"0" * 33                          # odd length: text
    for short in ("", "short", "ab" * 7):
        with pytest.raises(ConfigError):
            parse_key(short)
    with pytest.raises(ConfigError, match="CLICKPULSE_SNAPSHOT_KEY"):
        Settings.from_env({"CLICKPULSE_SNAPSHOT_KEY": "tooshort"})
    s = Settings.from_env({"CLICKPULSE_SNAPSHOT_KEY": "ab" * 32})
    assert snapshot_key(s) == b"\xab" * 32 and "abab" not in repr(s)
    assert Settings.from_env(s.env()) == s                           # reaches subprocesses (demo, tests)


def test_key_file_is_created_once_private_and_shared(tmp_path):
    s = Settings(data_dir=str(tmp_path / "data"))
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(snapshot_key(s))) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    path = tmp_path / "data" / KEY_FILE
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]     # no temporary files left
    assert snapshot_key(s) == keys[0]
    assert snapshot_key(Settings(data_dir=str(tmp_path / "elsewhere"))) != keys[0]
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        snapshot_key(s)


# the allow-list unpickler --------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", ["logreg", "arf", "hoeffding"])
def test_safe_loads_round_trips_every_pipeline(pipeline):
    m = OnlineModel("intent", pipeline, seed=3)
    rng = random.Random(2)
    for _ in range(600):
        y = rng.random() < 0.4
        m.learn({"a": rng.gauss(1.0 if y else -1.0, 1.0), "b": rng.random()}, y)
    back = OnlineModel.from_bytes(m.to_bytes())
    xs = [{"a": rng.gauss(0, 1), "b": rng.random()} for _ in range(20)]
    assert [back.score(x) for x in xs] == [m.score(x) for x in xs] and back.examples == 600


def global_pickle(module: str, name: str) -> bytes:
    """A protocol-4 pickle of just the global ``module.name``."""
    m, n = module.encode(), name.encode()
    return b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93."


def test_safe_loads_refuses_gadgets(tmp_path):
    for evil in (Evil(tmp_path / MARKER), EvilExec(tmp_path / MARKER)):
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            safe_loads(pickle.dumps(evil), OnlineModel)
    assert not (tmp_path / MARKER).exists()

    class FromBytes:   # getattr(OnlineModel, "from_bytes")(bytes): a class attribute, not a bound method
        def __reduce__(self):
            return getattr, (OnlineModel, "from_bytes")

    class Dunder:      # getattr(instance, "__class__")
        def __reduce__(self):
            return getattr, (random.Random(1), "__class__")

    for gadget in (FromBytes(), Dunder()):
        with pytest.raises(pickle.UnpicklingError, match="getattr"):
            safe_loads(pickle.dumps(gadget), OnlineModel)
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        safe_loads(global_pickle("os", "system"), OnlineModel)
    import river.stream
    with pytest.raises(pickle.UnpicklingError, match="river.stream"):   # Cache() unpickles files
        safe_loads(pickle.dumps(river.stream.Cache(str(tmp_path))), OnlineModel)
    with pytest.raises(pickle.UnpicklingError, match="Path"):            # a re-exported foreign class
        safe_loads(global_pickle("clickpulse.models.registry", "Path"), OnlineModel)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):         # a dotted name walks attributes
        safe_loads(global_pickle("clickpulse.models.online", "OnlineModel.from_bytes"), OnlineModel)
    with pytest.raises(TypeError, match="not OnlineModel"):
        safe_loads(pickle.dumps({"a": 1}), OnlineModel)
