"""The profile API against the real Redis (schemathesis over the live service), and the workers'
refill of every profile after Redis restarts empty (a private redis-server: the shared one on
6379 is never stopped)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from clickpulse.runtime import REPO_ROOT, free_port, stop_process_group
from clickpulse.serving.redis_sink import ProfileWriter, alias_key, epoch_key, profile_key, segment_key
from clickpulse.observability.metrics import Metrics
from clickpulse.settings import Settings
from clickpulse.testing import memory_engine

from .conftest import produce, wait_for

pytestmark = pytest.mark.integration

KEY = uuid.uuid4().hex  # 32 characters
SPEC = REPO_ROOT / "schemas" / "profile-api.openapi.yaml"


class ApiProcess:
    """``clickpulse api`` as a subprocess on a free port."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **settings.env(), "CLICKPULSE_API_KEYS": KEY, "CLICKPULSE_API_PORT": str(self.port)}
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "clickpulse.cli", "--log-level", "info", "api"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            assert self.proc.poll() is None, f"clickpulse api exited; log {log_path}"
            try:
                return self.get("/health", auth=False)[0] in (200, 503)
            except OSError:
                return False
        wait_for(up, 30, "clickpulse api to answer")

    def get(self, path: str, auth: bool = True) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, headers={"X-API-Key": KEY} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, orjson.loads(resp.read()) if "json" in resp.headers["Content-Type"] else {}
        except urllib.error.HTTPError as err:
            return err.code, orjson.loads(err.read())

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.log.close()


class PrivateRedis:
    """A redis-server of this test only, without persistence: killing and starting it again is
    Redis restarting empty."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (deploy/local/redis.sh installs it)")
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(port=self.port)

        def ping():
            try:
                return client.ping()
            except redis.ConnectionError:
                return False
        wait_for(ping, 20, "the private redis-server")

    def kill(self) -> None:
        """SIGKILL: everything in memory is gone."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process_group(self.proc, timeout_s=10)


def _delete_namespace(client: redis.Redis, ns: str) -> None:
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        client.delete(*keys)


def _events(user: str, t0: int, adds: int, views: int = 1) -> list[tuple[str, dict]]:
    out = [(user, {"event_id": f"{user}-v{i}", "type": "page_view", "user_id": user, "timestamp": t0 + i * 1000,
                   "properties": {"page_type": "home"}}) for i in range(views)]
    out += [(user, {"event_id": f"{user}-a{i}", "type": "add_to_cart", "user_id": user,
                    "timestamp": t0 + (views + i) * 1000,
                    "properties": {"product_id": f"p{i}", "price": 10.0, "currency": "EUR"}}) for i in range(adds)]
    return out


def test_schemathesis_against_the_live_api(local_services: Settings, tmp_path: Path):
    """Real profiles (the engine's, written by the worker's ProfileWriter) in the real Redis; the
    API as its own process; schemathesis checks every operation against the OpenAPI spec (status
    codes, content types, response schemas, auth ignored or not, negative inputs rejected)."""
    if shutil.which("st", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    s = local_services.replace(namespace=f"it-{uuid.uuid4().hex[:10]}", api_keys=KEY)
    r = redis.Redis.from_url(s.redis_url)
    eng = memory_engine()
    t0 = int(time.time() * 1000) - 60_000
    batch = []
    for user, adds in (("c-5", 0), ("anon:g-77", 1), ("h1", 3), ("h2", 4), ("h3", 3), ("a/b c", 0)):
        for _k, ev in _events(user, t0, adds):
            ev = {**ev, "timestamp_ms": ev.pop("timestamp"), "user_key": user}
            if user.startswith("anon:"):
                ev["anonymous_id"] = user[5:]
                del ev["user_id"]
            batch.append((0, ev))
    em = eng.step(batch, t0 + 60_000)
    eng.commit(em)

    async def write() -> None:
        import redis.asyncio as aioredis
        client = aioredis.from_url(s.redis_url)
        w = ProfileWriter(client, s.namespace, 600, 1000, Metrics())
        w.segment_names(g.name for g in eng.ruleset().segments)
        for key, st in em.states.items():
            w.mark(key, st.profile(extra=eng.profile_extra(st)))
        assert await w.flush() == 6
        await client.aclose()
    asyncio.run(write())
    r.set(alias_key(s.namespace, "anon:g-77"), "c-5")  # as identity stitching writes it
    api = ApiProcess(s, tmp_path / "api.log")
    try:
        st, body = api.get("/v1/profiles/" + urllib.parse.quote("anon:g-77", safe=""))
        assert st == 200 and body["user_key"] == "c-5"
        assert api.get("/v1/profiles/c-5", auth=False)[0] == 401
        members, cursor = [], None
        while True:
            st, page = api.get("/v1/segments/hesitant_buyers/members?limit=2" + (f"&cursor={cursor}" if cursor else ""))
            assert st == 200, page
            members += page["members"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert members == ["h1", "h2", "h3"]
        assert api.get("/v1/segments/highly_engaged/members")[1]["members"] == []  # declared, no member
        res = subprocess.run([str(Path(sys.executable).parent / "st"), "run", str(SPEC), "--url", api.url,
                              "-H", f"Authorization: Bearer {KEY}", "--checks", "all", "--max-examples", "40",
                              "--no-color"], capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)  # its .schemathesis/ cache (replayable failures) goes there
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    finally:
        api.stop()
        _delete_namespace(r, s.namespace)


def test_refill_after_redis_restarts_empty(make_settings, workers, tmp_path: Path):
    """A worker with state for N users; its (private) Redis is killed and started again empty; with
    no new event, every profile and segment membership comes back, identical, and is served by the API."""
    pr = PrivateRedis(tmp_path)
    api = None
    try:
        s = make_settings(redis_url=pr.url, redis_refill_check_s=0.5, redis_refill_rate=200.0, models_enabled=False)
        n = 120
        t0 = int(time.time() * 1000) - 120_000
        records = []
        hesitant = sorted(f"user-{i:03d}" for i in range(0, n, 7))
        for i in range(n):
            u = f"user-{i:03d}"
            records += _events(u, t0, 3 if u in hesitant else 0)
        produce(s, records)
        w = workers(s)
        client = redis.Redis(port=pr.port)
        keys = [profile_key(s.namespace, f"user-{i:03d}") for i in range(n)]
        seg = segment_key(s.namespace, "hesitant_buyers")

        events = [1 + (3 if f"user-{i:03d}" in hesitant else 0) for i in range(n)]

        def all_profiles():  # every profile present and up to date (all its events counted)
            vals = client.mget(keys)
            if any(v is None for v in vals):
                return None
            profs = [orjson.loads(v) for v in vals]
            return profs if [p["lifetime"]["events"] for p in profs] == events else None

        def comparable(profs):  # the smoothed conversion depends on the population when it was built
            return [{**p, "conversion": {**p["conversion"], "rate_smoothed": None}} for p in profs]
        before = wait_for(all_profiles, 120, f"the {n} profiles in redis")
        wait_for(lambda: sorted(m.decode() for m in client.zrange(seg, 0, -1)) == hesitant, 60, "the segment set")
        # the sentinels are set by the refill check (every 0.5 s), behind the profiles: waited for
        wait_for(lambda: all(client.get(epoch_key(s.namespace, p)) for p in range(s.partitions)), 60,
                 "every partition's sentinel after the first start")
        api = ApiProcess(s, tmp_path / "api.log")
        assert api.get("/v1/profiles/user-007")[1] == before[7]

        pr.kill()
        pr.start()  # empty: no persistence
        after = wait_for(all_profiles, 180, f"the {n} profiles refilled")
        assert comparable(after) == comparable(before)
        wait_for(lambda: sorted(m.decode() for m in client.zrange(seg, 0, -1)) == hesitant, 60, "the segment set refilled")
        wait_for(lambda: all((client.get(epoch_key(s.namespace, p)) or b"").startswith(b"done:")
                             for p in range(s.partitions)), 60, "every partition's sentinel")
        # first start + after the loss (the counter follows the sentinel's SET: waited for, not raced)
        wait_for(lambda: w.metrics().get("clickpulse_redis_refills_total", 0) >= 2 * s.partitions, 60,
                 "a refill counted per partition, twice")
        metrics = w.metrics()
        assert metrics.get("clickpulse_redis_profiles_refilled_total", 0) >= n
        processed = sum(v for k, v in metrics.items() if k.startswith("clickpulse_events_processed_total{"))
        assert processed == len(records)  # no new event was needed
        st, page = api.get("/v1/segments/hesitant_buyers/members?limit=1000")
        assert st == 200 and page["members"] == hesitant
        assert api.get("/v1/profiles/user-119")[1] == after[119]
    finally:
        if api is not None:
            api.stop()
        pr.stop()
