"""``clickpulse`` command line: worker, trainer, replay, demo, deliver, evaluate, report, rules, quarantine, privacy.

Settings come from ``CLICKPULSE_*`` env vars (see :mod:`clickpulse.settings`); flags override
the few that matter per command. Logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import orjson

from .errors import ClickpulseError
from .ingest.datasets import BUNDLED_SAMPLE
from .ingest.replay import FORMATS, messages, publish
from .quarantine import REPAIRABLE_FIELDS
from .settings import Settings
from .topics import ensure_topics

log = logging.getLogger("clickpulse")


def cmd_worker(args: argparse.Namespace) -> int:
    import faust  # noqa: F401 - heavy import only for the worker

    from .app import create_app

    settings = Settings.from_env()
    if args.mode:
        settings = settings.replace(time_mode=args.mode)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(ensure_topics(settings))
    app = create_app(settings)
    from .store import wipe_local_tables
    wipe_local_tables(app)  # the changelog is the source of truth: recover from it
    from faust.worker import Worker

    worker = Worker(app, loglevel=args.loglevel, logfile=None, quiet=True, override_logging=True)
    worker.execute_from_commandline()  # exits the process
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    from .models.trainer import run

    settings = Settings.from_env()
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    asyncio.run(ensure_topics(settings))
    asyncio.run(run(settings))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .models.evaluate import run_cli

    return run_cli(args.dataset, args.pipeline, args.limit, args.seed)


def cmd_report_paths(args: argparse.Namespace) -> int:
    from .models.markov import report_paths

    print(report_paths(args.file, k=args.top, max_len=args.max_len))
    return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    """Validate a rules file offline (exit 1 with the error, as the worker would reject it)."""
    from .rules.ruleset import load_rules

    path = args.file or Settings.from_env().rules_file
    if path is None:
        print("CLICKPULSE_RULES_PATH=none: no rules")
        return 0
    rs = load_rules(path)  # a RulesError is printed by main() with exit code 2
    print(f"{path}: valid, version {rs.version}")
    for seg in rs.segments:
        print(f"  segment {seg.name:<24} min_size {seg.min_size:<4} when {seg.when.source}")
    for t in rs.triggers:
        on = t.on.event_type if t.on.kind == "event" else f"{t.on.kind} {t.on.segment}" if t.on.segment else \
            f"timeout after {t.on.timeout.after}, no {'/'.join(t.on.timeout.no)} within {t.on.timeout.within_s:g} s"
        extras = ", ".join(x for x in (f"cooldown {t.cooldown_s:g} s" if t.cooldown_s else "",
                                       f"once per {t.once_per}" if t.once_per else "",
                                       f"needs {t.requires_consent} consent" if t.requires_consent else "") if x)
        print(f"  trigger {t.name:<24} on {on} -> {t.action.type}" + (f" ({extras})" if extras else ""))
    for w in rs.warnings:
        print(f"  warning: {w}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    records = messages(args.format, args.file)
    first = next(records, None)  # reads the header: a bad file fails before touching Kafka
    records = itertools.chain([first] if first is not None else [], records)
    asyncio.run(ensure_topics(settings))
    if args.flush and not settings.control_key:
        print("clickpulse replay --flush: set CLICKPULSE_CONTROL_KEY to the worker's control key (the end of "
              "input is signed; an unsigned one is dead-lettered as forged_control)", file=sys.stderr)
        return 2
    res = asyncio.run(publish(settings.kafka_bootstrap, settings.topic_raw, records,
                              speed=args.speed, flush=args.flush, control_key=settings.control_key))
    print(f"published {res.published} records from {args.file} to {settings.topic_raw} in {res.seconds:.2f} s"
          f"{' + end_of_input on every partition' if res.flushed else ''}")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    """List the quarantined users (latest record per user) or show one, with its decoded state."""
    import base64

    from .runtime import read_topic
    from .state.user import UserState
    settings = Settings.from_env()
    latest: dict[str, dict] = {}
    for key, value, _meta in asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_quarantine,
                                                    timeout_s=args.timeout)):
        if key is not None:
            if value is None:
                latest.pop(key.decode(), None)
            else:
                latest[key.decode()] = orjson.loads(value)
    if args.quarantine_cmd == "list":
        for k, rec in sorted(latest.items()):
            print(f"{k}\t{rec['quarantined_at']}\t{rec['stage']}\t{rec['error'][:120]}")
        print(f"{len(latest)} quarantined user(s) on {settings.topic_quarantine}", file=sys.stderr)
        return 0
    rec = latest.get(args.user_key)
    if rec is None:
        print(f"{args.user_key}: not quarantined", file=sys.stderr)
        return 1
    out = dict(rec)
    if rec.get("state_b64"):
        raw = base64.b64decode(rec["state_b64"])
        try:
            st = UserState.from_bytes(raw)
            out["state"] = orjson.loads(orjson.dumps(st.profile(), option=orjson.OPT_NON_STR_KEYS))
        except Exception as err:  # noqa: BLE001 - show what can be shown
            out["state_error"] = f"{type(err).__name__}: {err}"
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_quarantine_repair(args: argparse.Namespace) -> int:
    """Ask the owning worker to repair a quarantined user (see :mod:`clickpulse.quarantine`); exit
    0 when repaired, 1 when not quarantined or the worker could not repair it."""
    from .quarantine import quarantined, request_repair
    bad = [f for f in args.drop_field if f not in REPAIRABLE_FIELDS]
    if bad:
        print(f"clickpulse quarantine repair: cannot drop {bad}; fields: {', '.join(sorted(REPAIRABLE_FIELDS))}",
              file=sys.stderr)
        return 2
    settings = Settings.from_env()
    rec = quarantined(settings, min(args.timeout, 30.0)).get(args.user_key)
    if rec is None:
        print(f"{args.user_key}: not quarantined", file=sys.stderr)
        return 1
    out = request_repair(settings, args.user_key, rec, mode="reset" if args.reset else "retry",
                         drop_fields=args.drop_field, wait=not args.no_wait, timeout_s=args.timeout)
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0 if args.no_wait or out.get("repair", {}).get("outcome") == "repaired" else 1


def cmd_privacy(args: argparse.Namespace) -> int:
    """Erase or export one user's data (see :mod:`clickpulse.privacy`)."""
    from .privacy import export_user, request_erase
    if not args.user_key or any(ord(c) < 0x20 or ord(c) == 0x7F for c in args.user_key):
        print("clickpulse privacy: USER_KEY must be a non-empty key without control characters "
              "(the contract refuses such identifiers, so no user has one)", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    if args.privacy_cmd == "erase":
        out = request_erase(settings, args.user_key, wait=not args.no_wait, timeout_s=args.timeout)
    else:
        out = export_user(settings, args.user_key)
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    return 0
def cmd_deliver(args: argparse.Namespace) -> int:
    """Deliver the actions topic to a sink once per action_id (see clickpulse.delivery)."""
    from .delivery import run_cli

    return run_cli(args.sink, out=args.out, url=args.url, metrics_port=args.metrics_port, start_from=args.start_from)


def cmd_demo(args: argparse.Namespace) -> int:
    from .runtime import WorkerProcess, free_port, read_topic, services, wait_caught_up

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started_services = False
    if not args.no_services:
        if not services("status"):
            print("starting local Kafka and Redis (deploy/local/services.sh start) ...", flush=True)
            services("start")
            started_services = True
    run = time.strftime("%Y%m%d%H%M%S")
    settings = Settings.from_env().replace(namespace=f"demo-{run}", time_mode="replay", web_port=free_port())
    if "CLICKPULSE_ASSUME_CONSENT" not in os.environ:
        # public clickstream datasets carry no consent events: assume the shop collected marketing
        # consent upstream, so the default rules' marketing triggers can fire (set
        # CLICKPULSE_ASSUME_CONSENT= to see them suppressed with outcome "consent")
        settings = settings.replace(assume_consent="marketing")
    for name in ("worker.log", "trainer.log"):
        (out_dir / name).unlink(missing_ok=True)
    settings = settings.replace(trainer_web_port=free_port())
    if not settings.control_key:  # this run's worker and replay share a fresh key for --flush
        import secrets
        settings = settings.replace(control_key=secrets.token_hex(32))
    from .models.registry import snapshot_key
    # the snapshot signing key: CLICKPULSE_SNAPSHOT_KEY, else the key file in the data dir that the
    # worker and the trainer started below share (created now if missing, so they cannot race)
    key = snapshot_key(settings)
    worker = WorkerProcess(settings, out_dir / "worker.log")
    trainer = WorkerProcess(settings, out_dir / "trainer.log", command="trainer")
    try:
        asyncio.run(ensure_topics(settings))
        print(f"starting a worker and the trainer (namespace {settings.namespace}, logs in {out_dir}) ...",
              flush=True)
        worker.start()
        trainer.start()
        worker.wait_ready()
        trainer.wait_ready()
        print(f"replaying {args.file} ({args.format}) to {settings.topic_raw}"
              f"{' with --flush' if args.flush else ''} ...", flush=True)
        t0 = time.monotonic()
        res = asyncio.run(publish(settings.kafka_bootstrap, settings.topic_raw, messages(args.format, args.file),
                                  flush=args.flush, control_key=settings.control_key))
        wait_caught_up(worker, settings)
        elapsed = time.monotonic() - t0
        m = worker.metrics()
        segments_now = orjson.loads(worker.get("/segments"))
        actions = asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_actions))
        from .models.trainer import latest_snapshots
        from .runtime import end_offsets
        # wait until the trainer's snapshots cover every example on the training topic
        n_examples = sum(asyncio.run(end_offsets(settings.kafka_bootstrap, settings.topic_training)).values())
        deadline = time.monotonic() + 60
        while True:
            snapshots = asyncio.run(latest_snapshots(settings.kafka_bootstrap, settings.topic_models, key=key))
            covered = sum(env["examples"] for env in snapshots.values())
            if covered >= n_examples or time.monotonic() > deadline or not trainer.alive():
                break
            time.sleep(1.0)
        trainer.stop()
    finally:
        worker.stop()
        trainer.stop()
        if started_services and not args.keep_services:
            services("stop")
    path = out_dir / "actions.jsonl"
    with path.open("wb") as fh:
        for _k, v, _meta in actions:
            fh.write(v + b"\n")
    by_type = Counter(orjson.loads(v)["type"] for _k, v, _m in actions)

    def total(prefix: str) -> int:
        return int(sum(v for k, v in m.items() if k.startswith(prefix + "{") or k == prefix))

    events_in = total("clickpulse_events_processed_total")
    print()
    print("clickpulse demo summary")
    print(f"  input               {res.published} records from {args.file}")
    print(f"  events in           {events_in}  (applied to user state)")
    print(f"  invalid             {total('clickpulse_events_invalid_total')}  (dead-letter topic {settings.topic_dlq})")
    print(f"  duplicates          {total('clickpulse_events_duplicate_total')}")
    print(f"  late                {total('clickpulse_events_late_total')}")
    print(f"  users               {total('clickpulse_users_new_total')}")
    print(f"  sessions            {total('clickpulse_sessions_started_total')}")
    print(f"  actions             {dict(sorted(by_type.items())) or '{}'}")
    print(f"  rules               {segments_now['rules_version']} (consent assumed: "
          f"{', '.join(sorted(settings.assumed_consent)) or 'none'})")
    decisions = Counter()
    for k, v in m.items():
        if k.startswith("clickpulse_rule_decisions_total{") and v:
            labels = dict(x.split("=", 1) for x in k[k.index("{") + 1:-1].split(","))
            decisions[(labels["trigger"], labels["outcome"])] += int(v)
    for trig in sorted({t for t, _o in decisions}):
        outs = ", ".join(f"{o} {n}" for (t, o), n in sorted(decisions.items()) if t == trig)
        print(f"    trigger {trig:<22} {outs}")
    for name, seg in segments_now["segments"].items():
        print(f"    segment {name:<22} {seg['members']} members (min_size {seg['min_size']}, "
              f"{'active' if seg['active'] else 'inactive'}), conversion {seg.get('rate', 0.0):.3f} raw / "
              f"{seg.get('rate_smoothed', 0.0):.3f} smoothed over {seg.get('stints', 0)} stints")
    carts = [orjson.loads(v) for _k, v, _m in actions if orjson.loads(v)["type"] == "cart_abandoned"]
    for rec in carts[:5]:
        print(f"    {rec['type']} user {rec['user_key']} at {rec['event_time']}: {rec['reason']}")
    if len(carts) > 5:
        print(f"    ... and {len(carts) - 5} more cart_abandoned (all in {out_dir / 'actions.jsonl'})")
    for task in ("intent", "churn"):
        env = snapshots.get(task)
        if env is None:
            print(f"  model {task:<13} no labeled examples yet")
            continue
        r = env["metrics"]
        a = r["all"]
        if 0 < r["positives"] < r["n"]:
            quality = (f"ROC AUC {a['roc_auc']:.3f}, PR AUC {a['pr_auc']:.3f}, log loss {a['log_loss']:.3f}, "
                       f"F1@{r['threshold']} {a['f1']:.3f}")
        else:
            quality = f"log loss {a['log_loss']:.3f} (one class only: no ROC/PR AUC yet)"
        print(f"  model {task:<13} {env['examples']} examples ({r['positives']} positive), "
              f"progressive validation: {quality}")
    print(f"  throughput          {res.published / elapsed:.0f} events/s end to end "
          f"({elapsed:.1f} s from first publish to caught up)")
    print(f"  actions written to  {path.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clickpulse", description=__doc__.split("\n")[0])
    p.add_argument("--log-level", default="warning", help="logging level for this command (default warning)")
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("worker", help="run the stream worker (Faust) until SIGTERM/SIGINT")
    w.add_argument("--mode", choices=("live", "replay"), help="override CLICKPULSE_TIME_MODE")
    w.add_argument("--loglevel", default="info")
    w.set_defaults(func=cmd_worker)

    t = sub.add_parser("trainer", help="run the single model trainer (training topic -> model snapshots)")
    t.add_argument("--loglevel", default="info")
    t.set_defaults(func=cmd_trainer)

    e = sub.add_parser("evaluate", help="progressive validation of a model on a public dataset")
    e.add_argument("task", choices=("intent",))
    e.add_argument("--dataset", default="uci", help="uci (bundled UCI Online Shoppers Purchasing Intention)")
    e.add_argument("--pipeline", default="all", help="logreg | arf | hoeffding | all")
    e.add_argument("--limit", type=int, default=None, help="only the first N rows")
    e.add_argument("--seed", type=int, default=42)
    e.set_defaults(func=cmd_evaluate)

    rp = sub.add_parser("report", help="offline reports over a dataset")
    rsub = rp.add_subparsers(dest="report", required=True)
    paths = rsub.add_parser("paths", help="most frequent session paths that lead to a purchase (REES46 CSV)")
    paths.add_argument("--file", default=str(BUNDLED_SAMPLE))
    paths.add_argument("--top", type=int, default=10)
    paths.add_argument("--max-len", type=int, default=4)
    paths.set_defaults(func=cmd_report_paths)

    ru = sub.add_parser("rules", help="rules file tools")
    rusub = ru.add_subparsers(dest="rules_cmd", required=True)
    chk = rusub.add_parser("check", help="validate a rules file and list its segments and triggers")
    chk.add_argument("file", nargs="?", help="default: CLICKPULSE_RULES_PATH (or the packaged default rules)")
    chk.set_defaults(func=cmd_rules_check)

    r = sub.add_parser("replay", help="publish a dataset to the raw topic, preserving event time")
    r.add_argument("--format", choices=FORMATS, required=True)
    r.add_argument("file")
    r.add_argument("--speed", type=float, default=0.0,
                   help="event-time speed-up (60 = an hour of data per minute); 0 = as fast as possible")
    r.add_argument("--flush", action="store_true",
                   help="end with end_of_input on every partition: close the file's event time so pending timers fire")
    r.set_defaults(func=cmd_replay)

    q = sub.add_parser("quarantine", help="users whose stored state could not be processed (moved aside by the "
                                          "worker; they continue from a fresh state)")
    qsub = q.add_subparsers(dest="quarantine_cmd", required=True)
    ql = qsub.add_parser("list", help="one line per quarantined user: key, when, stage, error")
    ql.add_argument("--timeout", type=float, default=10.0)
    ql.set_defaults(func=cmd_quarantine)
    qs = qsub.add_parser("show", help="one quarantined user's record and its decoded state (as a profile)")
    qs.add_argument("user_key")
    qs.add_argument("--timeout", type=float, default=10.0)
    qs.set_defaults(func=cmd_quarantine)
    qr = qsub.add_parser("repair", help="put a quarantined user back: the owning worker re-tries its quarantined "
                                        "state with the running code (or --reset / --drop-field), merges it with the "
                                        "state it went on with, and publishes an audit record; prints it")
    qr.add_argument("user_key")
    qr.add_argument("--reset", action="store_true",
                    help="keep only the durable record (identifiers, consent decisions, lifetime totals)")
    qr.add_argument("--drop-field", action="append", default=[], metavar="FIELD",
                    help="reset this part of the quarantined state to empty (repeatable): " + ", ".join(
                        sorted(REPAIRABLE_FIELDS)))
    qr.add_argument("--no-wait", action="store_true", help="publish the request, do not wait for the audit record")
    qr.add_argument("--timeout", type=float, default=120.0)
    qr.set_defaults(func=cmd_quarantine_repair)

    pv = sub.add_parser("privacy", help="erase or export one user's data")
    pvsub = pv.add_subparsers(dest="privacy_cmd", required=True)
    pe = pvsub.add_parser("erase", help="erase a user everywhere clickpulse keeps state (state table, timers, "
                                        "predictions, segment sizes, Redis, quarantine); prints the audit record")
    pe.add_argument("user_key")
    pe.add_argument("--no-wait", action="store_true", help="publish the request, do not wait for the audit record")
    pe.add_argument("--timeout", type=float, default=120.0)
    pe.set_defaults(func=cmd_privacy)
    px = pvsub.add_parser("export", help="everything stored about a user, as JSON (state, profile, quarantine)")
    px.add_argument("user_key")
    px.set_defaults(func=cmd_privacy)
    dl = sub.add_parser("deliver", help="deliver <ns>.actions to a sink once per action_id (Redis de-duplication; "
                                        "undeliverable actions to <ns>.actions.dlq) until SIGTERM/SIGINT")
    dl.add_argument("--sink", choices=("jsonl", "webhook"), required=True)
    dl.add_argument("--out", help="jsonl: the file to append to (one action per line, fsynced per batch)")
    dl.add_argument("--url", help="webhook: the URL each action is POSTed to (JSON)")
    dl.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    dl.add_argument("--from", dest="start_from", choices=("earliest", "latest"), default="earliest",
                    help="where to start when the group <ns>-delivery has no committed offset (default earliest)")
    dl.set_defaults(func=cmd_deliver)

    d = sub.add_parser("demo", help="start local services and a worker, replay the bundled REES46 sample, "
                                    "write actions to OUT_DIR/actions.jsonl and print a summary")
    d.add_argument("--file", default=str(BUNDLED_SAMPLE))
    d.add_argument("--format", choices=FORMATS, default="rees46")
    d.add_argument("--flush", action="store_true", help="close the input's event time at the end (see replay)")
    d.add_argument("--out-dir", default="./demo-output")
    d.add_argument("--no-services", action="store_true", help="use already running Kafka/Redis (CLICKPULSE_* env)")
    d.add_argument("--keep-services", action="store_true", help="leave Kafka/Redis running afterwards")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd != "worker":
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ClickpulseError as err:
        print(f"clickpulse: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `clickpulse evaluate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
