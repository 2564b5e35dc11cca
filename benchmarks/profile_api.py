"""Profile API latency at a fixed request rate, beside a bare Redis GET in the same run.

    .venv/bin/python benchmarks/profile_api.py                       # 1,000 req/s, 2 rounds x 15 s each
    .venv/bin/python benchmarks/profile_api.py --rate 1000 --seconds 30 --rounds 3 --json

Open loop: request *i* is due at ``t0 + i / rate`` and is sent then whether or not earlier
requests have finished; its latency is measured **from its due time** to the end of its answer,
so a stall delays every request due meanwhile and shows in the tail (no coordinated omission).

Systems, measured by the same client process on loopback, interleaved by rounds (round 1 of each,
then round 2, ...) so the shared machine's drift hits both alike:

* ``redis GET``      — ``redis.asyncio`` ``GET <ns>:profile:<id>`` straight to Redis (the floor:
  one Redis round trip from a Python asyncio client);
* ``api profile``    — ``GET /v1/profiles/{id}`` on ``clickpulse api`` (a subprocess) through an
  ``aiohttp`` keep-alive client with ``X-API-Key``; 10 % of the ids are guests that resolve to
  their customer (two Redis round trips), the rest customers (one).

Data: the profiles of the bundled REES46 sample's 1,747 users, built by the engine
(``clickpulse.testing.memory_engine``) and written by the worker's ``ProfileWriter``, plus one
alias per 10th user (``guest-<n>`` -> the user), in a fresh namespace of the usual Redis
(``CLICKPULSE_REDIS_URL``), deleted at the end. Also printed: the API's own time in the handler
(``clickpulse_api_request_seconds``, bucket bounds) over the API rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import REPO, Sub, pct, say  # noqa: E402

from clickpulse.ingest.datasets import BUNDLED_SAMPLE  # noqa: E402
from clickpulse.ingest.replay import messages  # noqa: E402
from clickpulse.observability.metrics import Metrics  # noqa: E402
from clickpulse.runtime import free_port  # noqa: E402
from clickpulse.serving.redis_sink import ProfileWriter, alias_key  # noqa: E402
from clickpulse.settings import Settings  # noqa: E402
from clickpulse.store import key_partition  # noqa: E402
from clickpulse.testing import memory_engine  # noqa: E402

GUEST_SHARE = 0.1


def build_profiles() -> dict[str, dict[str, Any]]:
    """The profiles of the bundled sample's users, as the worker writes them."""
    from clickpulse.events.contract import parse
    eng = memory_engine()
    batch = []
    for key, value, ts in messages("rees46", str(BUNDLED_SAMPLE)):
        try:
            ev = parse(value, key, received_ms=ts, max_future_skew_ms=10**15)
        except Exception:  # noqa: BLE001 - the sample's few invalid rows
            continue
        batch.append((key_partition(ev["user_key"].encode(), 4), ev))
    em = eng.step(batch, batch[-1][1]["timestamp_ms"])
    eng.commit(em)
    return {k: st.profile(extra=eng.profile_extra(st)) for k, st in em.states.items()}


async def seed(url: str, ns: str, profiles: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Write the profiles and aliases; returns ``request id -> user key it resolves to``
    (customers and guests)."""
    import redis.asyncio as aioredis
    client = aioredis.from_url(url)
    w = ProfileWriter(client, ns, 3600, len(profiles) + 1, Metrics())
    for k, p in profiles.items():
        w.mark(k, p)
    await w.flush()
    users = sorted(profiles)
    ids = {u: u for u in users}
    async with client.pipeline(transaction=False) as pipe:
        for i, u in enumerate(users[::10]):
            g = f"guest-{i}"
            pipe.set(alias_key(ns, g), u, ex=3600)
            ids[g] = u
        await pipe.execute()
    await client.aclose()
    return ids


async def cleanup(url: str, ns: str) -> None:
    import redis.asyncio as aioredis
    client = aioredis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{ns}:*", count=1000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i:i + 1000])
    await client.aclose()


async def open_loop(call, ids: list[str], rate: float, seconds: float, rng: random.Random) -> dict[str, Any]:
    """Send ``rate * seconds`` calls, call i due at t0 + i/rate; latency from the due time (ms)."""
    n = int(rate * seconds)
    lat: list[float] = []
    errors = 0
    tasks = set()

    async def one(due: float, ident: str) -> None:
        nonlocal errors
        try:
            ok = await call(ident)
        except Exception:  # noqa: BLE001 - counted
            ok = False
        if not ok:
            errors += 1
        lat.append((time.perf_counter() - due) * 1000)

    picks = [ids[rng.randrange(len(ids))] for _ in range(n)]
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(due, picks[i]))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    ys = sorted(lat)
    return {"requests": n, "errors": errors, "achieved_rate": round(n / elapsed, 1), "lat_ms": ys}


def summary(ys: list[float]) -> dict[str, Any]:
    if not ys:
        return {}
    return {"n": len(ys), "p50_ms": round(pct(ys, 0.50), 3), "p90_ms": round(pct(ys, 0.90), 3),
            "p99_ms": round(pct(ys, 0.99), 3), "p999_ms": round(pct(ys, 0.999), 3), "max_ms": round(ys[-1], 3)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def handler_histogram(url: str) -> dict[float, float]:
    """Cumulative bucket counts of clickpulse_api_request_seconds{route="profile"}."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "clickpulse_api_request_seconds":
            for s in fam.samples:
                if s.name.endswith("_bucket") and s.labels.get("route") == "profile":
                    out[float(s.labels["le"])] = s.value
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Upper bound (ms) of the bucket holding quantile ``q`` of the observations between two scrapes."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0
    if not total:
        return None
    for le, c in zip(les, counts):
        if c >= q * total:
            return le * 1000
    return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import redis.asyncio as aioredis

    base = Settings.from_env()
    ns = f"bench-api-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    say("building the REES46 sample's profiles")
    profiles = build_profiles()
    resolves = await seed(base.redis_url, ns, profiles)
    ids = sorted(resolves)
    say(f"{len(profiles)} profiles + {len(ids) - len(profiles)} guest aliases in namespace {ns}")
    apis, urls = [], []
    for i in range(args.api_processes):  # stateless: scaled out as separate processes, round-robin
        port = free_port()
        apis.append(Sub([sys.executable, "-m", "clickpulse.cli", "api"], Path(args.log_dir) / f"api-{i}.log",
                        Path(args.log_dir) / f"api-{i}.status",
                        env={"CLICKPULSE_NAMESPACE": ns, "CLICKPULSE_API_KEYS": key,
                             "CLICKPULSE_API_PORT": str(port), "CLICKPULSE_REDIS_URL": base.redis_url}).start())
        urls.append(f"http://127.0.0.1:{port}")
    rng = random.Random(42)
    try:
        for api, u in zip(apis, urls):
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(u + "/health", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or not api.alive():
                        raise RuntimeError(f"clickpulse api did not start; log {api.log_path}") from None
                    time.sleep(0.2)
        rc = aioredis.from_url(base.redis_url, max_connections=256)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60),
                                        headers={"X-API-Key": key})
        keys = {i: f"{ns}:profile:{u}" for i, u in resolves.items()}

        async def redis_get(ident: str) -> bool:  # one GET of the profile the id resolves to
            return await rc.get(keys[ident]) is not None

        turn = [0]

        async def api_get(ident: str) -> bool:
            turn[0] += 1
            async with session.get(f"{urls[turn[0] % len(urls)]}/v1/profiles/{ident}") as resp:
                await resp.read()
                return resp.status == 200

        systems = {"redis GET": redis_get, "api profile": api_get}
        for name, call in systems.items():  # warm-up: connections, code paths
            await open_loop(call, ids, args.rate, 2.0, rng)
        results: dict[str, dict[str, Any]] = {n: {"lat": [], "rounds": []} for n in systems}
        hist_before = [handler_histogram(u) for u in urls]
        api_cpu = 0.0
        for r in range(args.rounds):
            for name, call in systems.items():
                c0 = sum(cpu_seconds(a.proc.pid) for a in apis)
                res = await open_loop(call, ids, args.rate, args.seconds, rng)
                if name == "api profile":
                    api_cpu += sum(cpu_seconds(a.proc.pid) for a in apis) - c0
                results[name]["lat"] += res["lat_ms"]
                row = {"round": r + 1, "achieved_rate": res["achieved_rate"], "errors": res["errors"],
                       **summary(res["lat_ms"])}
                results[name]["rounds"].append(row)
                say(f"round {r + 1} {name:<12} p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
                    f"({row['achieved_rate']:.0f} req/s, {row['errors']} errors)")
        hist_after = [handler_histogram(u) for u in urls]
        merged = [{le: sum(h.get(le, 0.0) for h in hs) for le in hs[0]} for hs in (hist_before, hist_after)]
        await session.close()
        await rc.aclose()
    finally:
        for api in apis:
            api.stop()
        await cleanup(base.redis_url, ns)
    out = {"rate": args.rate, "api_processes": args.api_processes, "seconds_per_round": args.seconds, "rounds": args.rounds, "profiles": len(profiles),
           "guest_share": round((len(ids) - len(profiles)) / len(ids), 3), "cpus": os.cpu_count(),
           "loadavg_1m": round(os.getloadavg()[0], 2),
           "systems": {n: {**summary(sorted(v["lat"])), "rounds": v["rounds"]} for n, v in results.items()},
           "api_cpu_us_per_request": round(1e6 * api_cpu / (args.rounds * int(args.rate * args.seconds)), 1),
           "api_handler_p50_bucket_ms": bucket_quantile(merged[0], merged[1], 0.5),
           "api_handler_p99_bucket_ms": bucket_quantile(merged[0], merged[1], 0.99)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per round and system (default 15)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--api-processes", type=int, default=1,
                   help="clickpulse api processes (separate ports, the client round-robins; default 1)")
    p.add_argument("--target-p99-ms", type=float, default=2.0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--log-dir", default=str(REPO / ".local" / "bench-profile-api"))
    args = p.parse_args()
    out = asyncio.run(run(args))
    if args.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"profile API ({args.api_processes} process{'es' if args.api_processes > 1 else ''}) at "
              f"{args.rate:.0f} req/s open loop, {args.rounds} x {args.seconds:.0f} s per system, "
              f"{out['profiles']} profiles ({out['guest_share']:.0%} guest ids), {out['cpus']} CPUs, "
              f"load {out['loadavg_1m']}")
        print(f"{'system':<14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}  rounds p99")
        for name, row in out["systems"].items():
            per = ", ".join(f"{r['p99_ms']:.2f}" for r in row["rounds"])
            print(f"{name:<14}{row['p50_ms']:>9.3f}{row['p90_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['p999_ms']:>10.3f}"
                  f"{row['max_ms']:>9.2f}  {per}")
        api99 = out["systems"]["api profile"]["p99_ms"]
        print(f"api handler time (server side, histogram bucket bound): p50 <= {out['api_handler_p50_bucket_ms']} ms, "
              f"p99 <= {out['api_handler_p99_bucket_ms']} ms")
        print(f"api server CPU: {out['api_cpu_us_per_request']:.0f} us per request "
              f"({out['api_cpu_us_per_request'] * args.rate / 1e4:.0f} % of one core at {args.rate:.0f} req/s)")
        verdict = "met" if api99 <= args.target_p99_ms else "NOT met"
        print(f"target p99 <= {args.target_p99_ms} ms: {verdict} (p99 {api99:.2f} ms; redis GET p99 "
              f"{out['systems']['redis GET']['p99_ms']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
