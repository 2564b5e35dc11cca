"""``clickpulse`` command line: worker, trainer, replay, demo, deliver, collector, api, evaluate, report, rules, quarantine, privacy, topics.

Settings come from ``CLICKPULSE_*`` env vars (see :mod:`clickpulse.settings`); flags override
the few that matter per command. Logging is configured here and only here.

Errors: every subcommand runs inside :func:`main`, which turns an error into one line on stderr,
``clickpulse: error: <message>``, and an exit code (:func:`error_exit`): 2 for invalid input
(settings, flags, files: :class:`~clickpulse.errors.ConfigError`, ``DatasetError``, ``RulesError``
...), 3 for an unavailable service (Kafka or Redis unreachable, a port in use:
:class:`~clickpulse.errors.ServiceError`), 70 for an unexpected exception (a bug). With
``CLICKPULSE_DEBUG=1`` the Python traceback is shown instead.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from .errors import ClickpulseError, ConfigError, DatasetError, ServiceError, error_text
from .ingest.datasets import BUNDLED_SAMPLE
from .ingest.replay import FORMATS, messages, publish
from .quarantine import REPAIRABLE_FIELDS
from .runtime import Progress, check_port_free
from .settings import Settings
from .topics import ensure_topics, kafka_unreachable

log = logging.getLogger("clickpulse")


def cmd_worker(args: argparse.Namespace) -> int:
    import faust  # noqa: F401 - heavy import only for the worker

    from .app import create_app

    settings = Settings.from_env()
    if args.mode:
        settings = settings.replace(time_mode=args.mode)
    check_port_free(settings.web_host, settings.web_port, "CLICKPULSE_WEB_PORT")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(ensure_topics(settings))
    _log_refused_connections_again()  # Kafka answered: from now on a lost broker is logged
    app = create_app(settings)
    from .store import wipe_local_tables
    wipe_local_tables(app)  # the changelog is the source of truth: recover from it
    from faust.worker import Worker

    worker = Worker(app, loglevel=args.loglevel, logfile=None, quiet=True, override_logging=True)
    try:
        worker.execute_from_commandline()  # exits the process
    except SystemExit as done:
        raise SystemExit(worker_exit_code(done.code)) from None
    return 0


def worker_exit_code(code: object) -> object:
    """The worker's exit code for what mode's ``Worker`` exits with: its 1 (``EX_FAILURE``: a
    service crashed on an exception, traceback in the log) becomes 70 (``EXIT_BUG``), the code
    every other unexpected exception gets; anything else is kept (0 after SIGTERM; 75 leaves
    through ``os._exit`` and never reaches here).

    >>> worker_exit_code(1), worker_exit_code(0), worker_exit_code(None)
    (70, 0, None)
    """
    return EXIT_BUG if code == 1 else code


def cmd_trainer(args: argparse.Namespace) -> int:
    from .models.trainer import run

    settings = Settings.from_env()
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    check_port_free(settings.web_host, settings.trainer_web_port, "CLICKPULSE_TRAINER_WEB_PORT")
    asyncio.run(ensure_topics(settings))
    _log_refused_connections_again()
    asyncio.run(run(settings))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task == "recs":
        from .recs.evaluate import run_cli as run_recs

        return run_recs(args.dataset or "all", args.k)
    from .models.evaluate import run_cli

    return run_cli(args.dataset or "uci", args.pipeline, args.limit, args.seed)


def cmd_report_paths(args: argparse.Namespace) -> int:
    from .models.markov import report_paths

    print(report_paths(args.file, k=args.top, max_len=args.max_len))
    return 0


def cmd_report_html(args: argparse.Namespace) -> int:
    from .report.html import write_report

    out = write_report(args.run_dir, args.out or Path(args.run_dir) / "report.html")
    print(f"report written to {out.resolve()} ({out.stat().st_size / 1e6:.1f} MB, works offline)")
    return 0


def cmd_report_experiments(args: argparse.Namespace) -> int:
    """Analyze the experiments' records (``<ns>.experiments`` or a JSON-lines file): a table with
    intervals, or JSON (``--json``); ``--textfile`` writes the Prometheus gauges."""
    from .experiments.report import aggregate, analyze, format_table, set_gauges

    if args.file:
        records = []
        with open(args.file, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError as err:
                    raise DatasetError(f"{args.file}: not a JSONL file of experiment records: line {lineno} is "
                                      f"not JSON ({err})") from None
                if not isinstance(rec, dict):
                    raise DatasetError(f"{args.file}: not a JSONL file of experiment records: line {lineno} is "
                                      f"a JSON {type(rec).__name__}, not an object")
                records.append(rec)
        source = args.file
    else:
        from .runtime import read_topic
        settings = Settings.from_env()
        source = settings.topic_experiments
        records = []
        for _key, value, _meta in asyncio.run(read_topic(settings.kafka_bootstrap, source, timeout_s=args.timeout)):
            try:
                records.append(orjson.loads(value))
            except orjson.JSONDecodeError:
                records.append({})  # counted as malformed below
    data, bad = aggregate(records)
    results = analyze(data, alpha=args.alpha, tau2=args.tau2, baseline=args.baseline,
                      declared=_declared_shares())
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
    else:
        print(f"{len(records)} records from {source}" + (f" ({bad} malformed, skipped)" if bad else ""))
        print(format_table(results))
    if args.textfile:
        from prometheus_client import write_to_textfile

        from .observability.metrics import ExperimentGauges
        m = ExperimentGauges()
        set_gauges(m, results)
        write_to_textfile(args.textfile, m.registry)
    return 0


def _declared_shares() -> dict[str, dict[str, float]]:
    """Experiment -> arm -> share of the configured rules (CLICKPULSE_RULES_PATH), to name the arms
    that have no exposure in the SRM check; empty when the rules cannot be read (the records'
    own shares still count)."""
    from .rules.ruleset import load_rules
    try:
        path = Settings.from_env().rules_file
        rs = load_rules(path) if path is not None else None
    except ClickpulseError as err:
        log.info("experiment shares from the records only (rules not read: %s)", err)
        return {}
    return {t.experiment.name: t.experiment.expected_shares() for t in (rs.triggers if rs else ())
            if t.experiment is not None}


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
        if t.experiment is not None:
            shares = ", ".join(f"{arm} {share:.0%}" for arm, share in t.experiment.expected_shares().items())
            print(f"    experiment {t.experiment.name}: {shares}; window {t.experiment.window_s:g} s")
    for w in rs.warnings:
        print(f"  warning: {w}")
    for w in _pii_dropped_reads(path):
        print(f"  warning: {w}")
    return 0


def _pii_dropped_reads(path: str) -> list[str]:
    """One warning per ``event.properties.<k>`` / ``event.context.<k>`` the rules file reads that
    the configured PII policy (CLICKPULSE_PII_POLICY_PATH) drops at ingest: such a condition is
    valid but never sees the key (it is always absent)."""
    import re

    import yaml

    from .events.pii import PiiPolicy
    policy = PiiPolicy.from_settings(Settings.from_env())
    kept = {sec: getattr(policy, sec) | {h.name for h in policy.hash if h.section == sec}
            for sec in ("properties", "context")}
    ref = re.compile(r"""\bevent\.(properties|context)(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*["']([^"']+)["']\s*\])""")
    found: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            for m in ref.finditer(node):
                found.add((m.group(1), m.group(2) or m.group(3)))
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    with open(path, "rb") as fh:
        walk(yaml.safe_load(fh))
    return [f"event.{sec}.{key} is read by a rule but the PII policy {policy.source} drops {sec}.{key} at "
            f"ingest, so the rule never sees it: add it to {sec}.allow of a policy of your own "
            "(CLICKPULSE_PII_POLICY_PATH; README, Custom event properties)"
            for sec, key in sorted(found) if key not in kept[sec]]


def cmd_replay(args: argparse.Namespace) -> int:
    from .ingest.replay import JsonlStats
    settings = Settings.from_env()
    if args.strict and args.format == "jsonl":
        for _ in messages(args.format, args.file, strict=True):  # the whole file, before touching Kafka
            pass
    stats = JsonlStats()
    records = messages(args.format, args.file, stats)
    first = next(records, None)  # reads the header: a bad file fails before touching Kafka
    records = itertools.chain([first] if first is not None else [], records)
    asyncio.run(ensure_topics(settings))
    if args.flush and not settings.control_key:
        print("clickpulse replay --flush: set CLICKPULSE_CONTROL_KEY to the worker's control key (the end of "
              "input is signed; an unsigned one is dead-lettered as forged_control)", file=sys.stderr)
        return 2
    progress = Progress(records, f"replay {Path(args.file).name}", every_s=0.0 if args.quiet else args.progress_s)
    res = asyncio.run(publish(settings.kafka_bootstrap, settings.topic_raw, progress,
                              speed=args.speed, flush=args.flush, control_key=settings.control_key))
    progress.done()
    print(f"published {res.published} records from {args.file} to {settings.topic_raw} in {res.seconds:.2f} s"
          f"{' + end_of_input on every partition' if res.flushed else ''}")
    if stats.not_objects:
        print(f"clickpulse replay: warning: {stats.not_objects} of {stats.lines} lines of {args.file} are not JSON "
              f"objects (the first: line {stats.first_bad}); the worker dead-letters them (reason not_json or "
              f"not_object, topic {settings.topic_dlq}); --strict refuses such a file before publishing",
              file=sys.stderr)
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
    from .delivery import check_sink_args, run_cli
    settings = Settings.from_env()
    check_sink_args(args.sink, args.out, args.url)  # before Kafka: a missing flag is an input error (exit 2)
    if args.metrics_port is not None:
        check_port_free(settings.web_host, args.metrics_port, "--metrics-port")
    asyncio.run(_kafka_answers(settings))
    _log_refused_connections_again()

    return run_cli(args.sink, out=args.out, url=args.url, metrics_port=args.metrics_port, start_from=args.start_from)


def cmd_collector(args: argparse.Namespace) -> int:
    """Serve the Segment/RudderStack HTTP tracking API (see clickpulse.collector)."""
    from .collector import run

    settings = Settings.from_env()
    if args.port is not None:
        settings = settings.replace(collector_port=args.port)
    if args.host is not None:
        settings = settings.replace(collector_host=args.host)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    # a port in use or an address not of this host: one line naming the setting, before any producer
    check_port_free(settings.collector_host, settings.collector_port,
                    "--port or CLICKPULSE_COLLECTOR_PORT" if args.host is None else "--host/--port")
    if not args.no_create_topics:
        try:
            asyncio.run(ensure_topics(settings))
        except Exception as err:  # noqa: BLE001 - Kafka may be down: the collector answers 503 until it is back
            log.warning("could not check/create topics (%s); starting anyway", error_text(err))
    run(settings)


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the profile API (see clickpulse.serving.api) until SIGTERM/SIGINT."""
    from .serving.api import run

    settings = Settings.from_env()
    host, port = args.host or settings.api_host, args.port or settings.api_port
    check_port_free(host, port, "--port or CLICKPULSE_API_PORT" if args.host is None else "--host/--port")
    run(settings, host=host, port=port)
    return 0


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
        t_start = time.monotonic()
        worker.start()
        trainer.start()
        worker.wait_ready()
        trainer.wait_ready()
        print(f"  worker and trainer ready ({time.monotonic() - t_start:.0f} s)", flush=True)
        print(f"replaying {args.file} ({args.format}) to {settings.topic_raw}"
              f"{' with --flush' if args.flush else ''} ...", flush=True)
        t0 = time.monotonic()
        progress = Progress(messages(args.format, args.file), "  replay", out=sys.stdout)
        res = asyncio.run(publish(settings.kafka_bootstrap, settings.topic_raw, progress,
                                  flush=args.flush, control_key=settings.control_key))
        progress.done()
        print("waiting for the worker to catch up ...", flush=True)
        for restarts in range(4):
            try:
                wait_caught_up(worker, settings, progress=sys.stdout)
                break
            except ServiceError:
                # exit 75: the worker saw its consumer skip or stall input and stopped before
                # committing past it (docs/operations.md); restarted here as a supervisor would
                if worker.alive() or worker.proc is None or worker.proc.returncode != 75 or restarts == 3:
                    raise
                print(f"  the worker exited 75 (its consumer skipped or stalled input; see {worker.log_path}); "
                      "restarting it, as a supervisor would", flush=True)
                worker.start()
                worker.wait_ready()
        elapsed = time.monotonic() - t0
        m = worker.metrics()
        segments_now = orjson.loads(worker.get("/segments"))
        business = orjson.loads(worker.get("/business"))  # metrics.json (clickpulse.metrics.business)
        recs_pairs = orjson.loads(worker.get("/recs"))      # recs.json: the top item pairs
        segment_changes = asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_segments))
        actions = asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_actions))
        experiments = asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_experiments))
        from .models.trainer import latest_snapshots
        from .runtime import end_offsets
        # wait until the trainer's snapshots cover every example on the training topic
        n_examples = sum(asyncio.run(end_offsets(settings.kafka_bootstrap, settings.topic_training)).values())
        print(f"waiting for the trainer to learn {n_examples} training examples (at most 60 s) ...", flush=True)
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
    with (out_dir / "experiments.jsonl").open("wb") as fh:  # clickpulse report experiments --file ...
        for _k, v, _meta in experiments:
            fh.write(v + b"\n")
    exp_counts = Counter((r["experiment"], r["kind"]) for r in (orjson.loads(v) for _k, v, _m in experiments))
    report = _demo_report_files(out_dir, settings, business, segment_changes, snapshots, recs_pairs)

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
    for exp in sorted({e for e, _k in exp_counts}):
        print(f"  experiment          {exp}: {exp_counts[(exp, 'exposure')]} exposed, "
              f"{exp_counts[(exp, 'conversion')]} conversions attributed (clickpulse report experiments "
              f"--file {out_dir / 'experiments.jsonl'})")
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
    print(f"  report              {report.resolve()} (clickpulse report html --from {out_dir})")
    return 0


def _demo_report_files(out_dir: Path, settings: Settings, business: Any, segment_changes: list[Any],
                       snapshots: dict[str, Any], recs_pairs: Any) -> Path:
    """The demo's files for the report (metrics.json, segments.jsonl, model.json, recs.json;
    see clickpulse.report.run) and the report itself, next to actions.jsonl."""
    from .report.html import write_report
    from .report.run import progressive_scores, segment_rows
    from .runtime import read_topic

    (out_dir / "metrics.json").write_bytes(orjson.dumps(business, option=orjson.OPT_INDENT_2))
    (out_dir / "recs.json").write_bytes(orjson.dumps(recs_pairs, option=orjson.OPT_INDENT_2))
    rows = segment_rows(orjson.loads(v) for _k, v, _m in segment_changes)
    (out_dir / "segments.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    training = asyncio.run(read_topic(settings.kafka_bootstrap, settings.topic_training))
    model = progressive_scores((orjson.loads(v) for _k, v, _m in training),
                               {"intent": settings.intent_pipeline, "churn": settings.churn_pipeline},
                               settings.model_seed, snapshots)
    (out_dir / "model.json").write_bytes(orjson.dumps(model))
    return write_report(out_dir, out_dir / "report.html")


def cmd_topics(args: argparse.Namespace) -> int:
    """``topics list``: the clickpulse namespaces on the cluster (or one's topics); ``topics clean``:
    delete a namespace's topics, consumer groups and (``--redis``) Redis keys, after a dry run."""
    from .topics import delete_namespace, footprints

    settings = Settings.from_env()
    # list: every namespace unless one (or a glob) is named; clean: only the one(s) named (--namespace
    # is required: a default would delete whatever CLICKPULSE_NAMESPACE happens to be)
    pattern = args.namespace or "*"
    fps = asyncio.run(footprints(settings, pattern, describe=args.topics_cmd == "clean" or args.namespace is not None))
    redis_keys: dict[str, list[bytes]] = {}
    if getattr(args, "redis", False):
        redis_keys = _redis_keys(settings, pattern)
        from .topics import NamespaceFootprint
        for ns in redis_keys:
            fps.setdefault(ns, NamespaceFootprint(ns))
        fps = dict(sorted(fps.items()))
    if args.topics_cmd == "list":
        if not fps:
            print(f"no clickpulse topics for namespace {pattern!r} on {settings.kafka_bootstrap}", file=sys.stderr)
            return 0
        if args.namespace is None:
            for ns, fp in fps.items():
                print(f"{ns}\t{len(fp.topics)} topics\t{' '.join(fp.groups)}")
            print(f"{len(fps)} namespace(s), {sum(len(fp.topics) for fp in fps.values())} topics on "
                  f"{settings.kafka_bootstrap}", file=sys.stderr)
        else:
            for ns, fp in fps.items():
                for t, n in sorted(fp.topics.items()):
                    print(f"{ns}\t{t}\t{_plural(n, 'partition')}")
                for g in fp.groups:
                    print(f"{ns}\t{g}\tconsumer group")
        return 0
    if not fps:
        print(f"nothing to delete: no clickpulse topics or consumer groups for namespace {pattern!r} on "
              f"{settings.kafka_bootstrap}")
        return 0
    for ns, fp in fps.items():
        keys = redis_keys.get(ns, [])
        print(f"namespace {ns}: {_plural(len(fp.topics), 'topic')}, {_plural(len(fp.groups), 'consumer group')}"
              + (f", {_plural(len(keys), 'Redis key')}" if args.redis else ""))
        for t, n in sorted(fp.topics.items()):
            print(f"  topic {t} ({_plural(n, 'partition')})")
        for g in fp.groups:
            print(f"  consumer group {g}")
    if not args.yes:
        print("dry run: nothing deleted; run again with --yes to delete the above")
        return 0
    from .topics import groups_with_members
    active = asyncio.run(groups_with_members(settings, [g for fp in fps.values() for g in fp.groups]))
    if active:  # every namespace's groups are checked before anything of any namespace is deleted
        raise ServiceError("; ".join(f"group {g} has members (its processes are running): stop them first"
                                     for g in sorted(active)) + "; nothing was deleted")
    problems: list[str] = []
    for ns, fp in fps.items():
        found = asyncio.run(delete_namespace(settings, fp))
        problems += [f"{ns}: {p}" for p in found]
        keys = redis_keys.get(ns, [])
        if keys and not any("has members" in p for p in found):
            _redis_delete(settings, keys)
        print(f"namespace {ns}: {'deleted' if not found else 'not fully deleted'}", flush=True)
    if problems:
        raise ServiceError("; ".join(problems))
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _redis_client(settings: Settings):  # noqa: ANN202 - redis.Redis
    import redis
    if not settings.redis_url:
        raise ConfigError("--redis needs CLICKPULSE_REDIS_URL (it is empty: Redis disabled)")
    return redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)


def _redis_keys(settings: Settings, pattern: str) -> dict[str, list[bytes]]:
    """Namespace -> Redis keys ``<ns>:...`` of the namespaces matching the glob ``pattern``."""
    import fnmatch
    out: dict[str, list[bytes]] = {}
    for key in _redis_client(settings).scan_iter(match=f"{pattern}:*", count=1000):
        ns = key.split(b":", 1)[0].decode(errors="replace")
        if fnmatch.fnmatchcase(ns, pattern):
            out.setdefault(ns, []).append(key)
    return out


def _redis_delete(settings: Settings, keys: list[bytes]) -> None:
    r = _redis_client(settings)
    for i in range(0, len(keys), 1000):
        r.unlink(*keys[i:i + 1000])


def _port(value: str) -> int:
    """argparse type of ``--port``: a TCP port in 1..65535."""
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (1..65535)")
    return port


def _log_level(value: str) -> str:
    """argparse type of ``--log-level`` / ``--loglevel``: a :mod:`logging` level name, any case."""
    name = value.strip().upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise argparse.ArgumentTypeError(f"unknown log level {value!r}: use debug, info, warning, error or critical")
    return name.lower()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("clickpulse")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from . import __version__
        return f"{__version__} (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clickpulse", description=__doc__.split("\n")[0].replace("``", ""),
        epilog="Settings are CLICKPULSE_* environment variables (README, Configuration). Errors are one line "
               "'clickpulse: error: ...' with exit code 2 (invalid input), 3 (Kafka/Redis unreachable, port "
               "in use) or 70 (a bug); CLICKPULSE_DEBUG=1 shows the traceback instead.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the installed clickpulse version and exit")
    p.add_argument("--log-level", default="warning", type=_log_level,
                   help="logging level of this command: debug, info, warning, error or critical (default warning)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", help="run the stream worker (Faust) until SIGTERM/SIGINT")
    w.add_argument("--mode", choices=("live", "replay"), help="override CLICKPULSE_TIME_MODE")
    w.add_argument("--loglevel", default="info", type=_log_level,
                   help="the worker's logging level (Faust and clickpulse; default info)")
    w.set_defaults(func=cmd_worker)

    t = sub.add_parser("trainer", help="run the single model trainer (training topic -> model snapshots)")
    t.add_argument("--loglevel", default="info", type=_log_level, help="the trainer's logging level (default info)")
    t.set_defaults(func=cmd_trainer)

    e = sub.add_parser("evaluate", help="progressive validation of a model on a public dataset")
    e.add_argument("task", choices=("intent", "recs"),
                   help="the model to evaluate (intent: purchase intent; recs: item-to-item recommendations)")
    e.add_argument("--dataset", default=None, help="intent: uci (bundled UCI Online Shoppers Purchasing "
                   "Intention, the default); recs: rees46 | diginetica | all (the default)")
    e.add_argument("--k", type=int, default=10, help="recs: list length of HR@k / MRR@k (default 10)")
    e.add_argument("--pipeline", default="all", help="logreg | arf | hoeffding | all")
    e.add_argument("--limit", type=int, default=None, help="only the first N rows")
    e.add_argument("--seed", type=int, default=42, help="seed of the pipelines (default 42)")
    e.set_defaults(func=cmd_evaluate)

    rp = sub.add_parser("report", help="offline reports over a dataset")
    rsub = rp.add_subparsers(dest="report", required=True, metavar="REPORT")
    paths = rsub.add_parser("paths", help="most frequent session paths that lead to a purchase (REES46 CSV)")
    paths.add_argument("--file", default=str(BUNDLED_SAMPLE), help="a REES46 CSV (default: the bundled sample)")
    paths.add_argument("--top", type=int, default=10, help="how many openings to print (default 10)")
    paths.add_argument("--max-len", type=int, default=4, help="events per session opening (default 4)")
    paths.set_defaults(func=cmd_report_paths)
    rh = rsub.add_parser("html", help="a self-contained HTML page of a run directory (demo-output/): actions, "
                                      "funnel, segments, models, experiments, cohorts, recommendations")
    rh.add_argument("--from", dest="run_dir", default="./demo-output",
                    help="the run directory (default ./demo-output)")
    rh.add_argument("--out", default=None, help="the HTML file to write (default RUN_DIR/report.html)")
    rh.set_defaults(func=cmd_report_html)
    rx = rsub.add_parser("experiments", help="experiment arms vs baseline: conversion and revenue with intervals, "
                                             "P(beats), expected loss, always-valid p, SRM (docs/experiments.md)")
    rx.add_argument("--file", help="JSON lines of experiment records (default: read <ns>.experiments)")
    rx.add_argument("--json", action="store_true", help="print the analysis as JSON (for plots)")
    rx.add_argument("--alpha", type=float, default=0.05, help="significance level of the tests and intervals (default 0.05)")
    rx.add_argument("--tau2", type=float, default=1e-4, help="mSPRT mixing variance (scale of rate differences)")
    rx.add_argument("--baseline", help="the arm to compare with (default: holdout, else control)")
    rx.add_argument("--textfile", help="also write the Prometheus gauges here (node_exporter textfile format)")
    rx.add_argument("--timeout", type=float, default=30.0, help="seconds to read the experiments topic (default 30)")
    rx.set_defaults(func=cmd_report_experiments)

    ru = sub.add_parser("rules", help="rules file tools")
    rusub = ru.add_subparsers(dest="rules_cmd", required=True, metavar="ACTION")
    chk = rusub.add_parser("check", help="validate a rules file and list its segments and triggers")
    chk.add_argument("file", nargs="?", help="default: CLICKPULSE_RULES_PATH (or the packaged default rules)")
    chk.set_defaults(func=cmd_rules_check)

    r = sub.add_parser("replay", help="publish a dataset to the raw topic, preserving event time")
    r.add_argument("--format", choices=FORMATS, required=True,
                   help="rees46 (REES46 e-commerce CSV) or jsonl (one raw event per line)")
    r.add_argument("file", help="the dataset file")
    r.add_argument("--speed", type=float, default=0.0,
                   help="event-time speed-up (60 = an hour of data per minute); 0 = as fast as possible")
    r.add_argument("--flush", action="store_true",
                   help="end with end_of_input on every partition: close the file's event time so pending timers fire")
    r.add_argument("--progress-s", type=float, default=2.0,
                   help="seconds between progress lines on stderr (records sent, rate; default 2)")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.add_argument("--strict", action="store_true",
                   help="jsonl: refuse the file (exit 2, nothing published) if a line is not a JSON object "
                        "(default: publish it, the worker dead-letters it, and warn with the count)")
    r.set_defaults(func=cmd_replay)

    q = sub.add_parser("quarantine", help="users whose stored state could not be processed (moved aside by the "
                                          "worker; they continue from a fresh state)")
    qsub = q.add_subparsers(dest="quarantine_cmd", required=True, metavar="ACTION")
    ql = qsub.add_parser("list", help="one line per quarantined user: key, when, stage, error")
    ql.add_argument("--timeout", type=float, default=10.0, help="seconds to read the quarantine topic (default 10)")
    ql.set_defaults(func=cmd_quarantine)
    qs = qsub.add_parser("show", help="one quarantined user's record and its decoded state (as a profile)")
    qs.add_argument("user_key", help="the user's key (user_id, or anon:<anonymous_id>)")
    qs.add_argument("--timeout", type=float, default=10.0, help="seconds to read the quarantine topic (default 10)")
    qs.set_defaults(func=cmd_quarantine)
    qr = qsub.add_parser("repair", help="put a quarantined user back: the owning worker re-tries its quarantined "
                                        "state with the running code (or --reset / --drop-field), merges it with the "
                                        "state it went on with, and publishes an audit record; prints it")
    qr.add_argument("user_key", help="the quarantined user's key (as in quarantine list)")
    qr.add_argument("--reset", action="store_true",
                    help="keep only the durable record (identifiers, consent decisions, lifetime totals)")
    qr.add_argument("--drop-field", action="append", default=[], metavar="FIELD",
                    help="reset this part of the quarantined state to empty (repeatable): " + ", ".join(
                        sorted(REPAIRABLE_FIELDS)))
    qr.add_argument("--no-wait", action="store_true", help="publish the request, do not wait for the audit record")
    qr.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the audit record (default 120)")
    qr.set_defaults(func=cmd_quarantine_repair)

    pv = sub.add_parser("privacy", help="erase or export one user's data")
    pvsub = pv.add_subparsers(dest="privacy_cmd", required=True, metavar="ACTION")
    pe = pvsub.add_parser("erase", help="erase a user everywhere clickpulse keeps state (state table, timers, "
                                        "predictions, segment sizes, Redis, quarantine); prints the audit record")
    pe.add_argument("user_key", help="the user's key (user_id, or anon:<anonymous_id>)")
    pe.add_argument("--no-wait", action="store_true", help="publish the request, do not wait for the audit record")
    pe.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the worker's audit record (default 120)")
    pe.set_defaults(func=cmd_privacy)
    px = pvsub.add_parser("export", help="everything stored about a user, as JSON (state, profile, quarantine)")
    px.add_argument("user_key", help="the user's key (user_id, or anon:<anonymous_id>)")
    px.set_defaults(func=cmd_privacy)
    dl = sub.add_parser("deliver", help="deliver <ns>.actions to a sink once per action_id (Redis de-duplication; "
                                        "undeliverable actions to <ns>.actions.dlq) until SIGTERM/SIGINT")
    dl.add_argument("--sink", choices=("jsonl", "webhook"), required=True,
                    help="jsonl: append to a file; webhook: POST each action to a URL")
    dl.add_argument("--out", help="jsonl: the file to append to (one action per line, fsynced per batch)")
    dl.add_argument("--url", help="webhook: the URL each action is POSTed to (JSON)")
    dl.add_argument("--metrics-port", type=_port, default=None, help="serve Prometheus /metrics on this port")
    dl.add_argument("--from", dest="start_from", choices=("earliest", "latest"), default="earliest",
                    help="where to start when the group <ns>-delivery has no committed offset (default earliest)")
    dl.set_defaults(func=cmd_deliver)

    co = sub.add_parser("collector", help="serve the Segment/RudderStack HTTP tracking API (POST /v1/track, "
                                          "/v1/batch, ...) into <ns>.events.raw until SIGTERM/SIGINT")
    co.add_argument("--port", type=_port, default=None, help="listen port (default CLICKPULSE_COLLECTOR_PORT, 8088)")
    co.add_argument("--host", default=None, help="listen address (default CLICKPULSE_COLLECTOR_HOST, 127.0.0.1)")
    co.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    co.add_argument("--loglevel", default="info", type=_log_level, help="the collector's logging level (default info)")
    co.set_defaults(func=cmd_collector)
    ap = sub.add_parser("api", help="serve the profile API (GET /v1/profiles/{id}, /v1/segments/{name}/members; "
                                    "keys from CLICKPULSE_API_KEYS) until SIGTERM/SIGINT")
    ap.add_argument("--host", help="override CLICKPULSE_API_HOST")
    ap.add_argument("--port", type=_port, help="override CLICKPULSE_API_PORT")
    ap.set_defaults(func=cmd_api)

    d = sub.add_parser("demo", help="start local services and a worker, replay the bundled REES46 sample, "
                                    "write actions to OUT_DIR/actions.jsonl and print a summary")
    d.add_argument("--file", default=str(BUNDLED_SAMPLE), help="the dataset to replay (default: the bundled sample)")
    d.add_argument("--format", choices=FORMATS, default="rees46", help="the dataset's format (default rees46)")
    d.add_argument("--flush", action="store_true", help="close the input's event time at the end (see replay)")
    d.add_argument("--out-dir", default="./demo-output", help="where actions.jsonl and the logs go "
                                                               "(default ./demo-output)")
    d.add_argument("--no-services", action="store_true", help="use already running Kafka/Redis (CLICKPULSE_* env)")
    d.add_argument("--keep-services", action="store_true", help="leave Kafka/Redis running afterwards")
    d.set_defaults(func=cmd_demo)

    tp = sub.add_parser("topics", help="the Kafka topics and consumer groups of clickpulse namespaces")
    tpsub = tp.add_subparsers(dest="topics_cmd", required=True, metavar="ACTION")
    tl = tpsub.add_parser("list", help="every clickpulse namespace on the cluster (topics, consumer groups), or "
                                       "one namespace's topics with --namespace")
    tl.add_argument("--namespace", metavar="NS", help="a namespace or a glob (demo-*): list its topics and groups")
    tl.set_defaults(func=cmd_topics)
    clean_help = ("delete a namespace's topics and consumer groups (dry run unless --yes); refused while its "
                  "worker, trainer or delivery is running (a consumer group with members); a running collector "
                  "or api cannot be detected: stop them first")
    tc = tpsub.add_parser("clean", help=clean_help, description=clean_help)
    tc.add_argument("--namespace", metavar="NS", required=True,
                    help="a namespace or a glob such as 'demo-*' (required; on a shared cluster a glob also "
                         "matches other people's namespaces: check the dry run)")
    tc.add_argument("--yes", action="store_true", help="really delete (without it: only list what would go)")
    tc.add_argument("--redis", action="store_true", help="also delete the namespace's Redis keys (<ns>:*: "
                                                        "profiles, delivery de-duplication)")
    tc.set_defaults(func=cmd_topics)
    return p


#: exit codes of :func:`main` (argparse's own usage errors exit 2 too)
EXIT_INVALID, EXIT_UNAVAILABLE, EXIT_BUG = 2, 3, 70


def error_exit(err: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception raised by a subcommand.

    The project's errors (:mod:`clickpulse.errors`) carry their message; a few library errors
    that mean the same things are recognised here too, so every subcommand — including ones
    added later — reports them alike: Kafka or Redis unreachable, a port in use, a file that
    cannot be read. Anything else is a bug: ``unexpected <type>: <message>``.
    """
    if isinstance(err, ServiceError):
        return str(err), EXIT_UNAVAILABLE
    if isinstance(err, ClickpulseError):
        return str(err), EXIT_INVALID
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
    if isinstance(err, (KafkaConnectionError, KafkaTimeoutError)):
        return str(kafka_unreachable(_bootstrap(), err)), EXIT_UNAVAILABLE
    if type(err).__module__.startswith("redis"):
        import redis
        if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
            return (f"Redis is not reachable (CLICKPULSE_REDIS_URL): {err}; is it running? "
                    "(locally: deploy/local/services.sh start)", EXIT_UNAVAILABLE)
    if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
        return f"a port is already in use: {err.strerror}", EXIT_UNAVAILABLE
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror}", EXIT_INVALID
    return (f"unexpected {error_text(err)} (a bug; CLICKPULSE_DEBUG=1 shows the traceback)",
            EXIT_BUG)


def _quiet_refused_connections(record: logging.LogRecord) -> bool:
    """Logging filter: drop aiokafka's "Unable connect to ..." records (the command says it once)."""
    return not str(record.msg).startswith("Unable connect to")


def _log_refused_connections_again() -> None:
    """For the long-running commands, once Kafka has answered: a broker lost later is logged."""
    logging.getLogger("aiokafka").removeFilter(_quiet_refused_connections)


async def _kafka_answers(settings: Settings) -> None:
    """Raise :class:`ServiceError` unless a broker answers at ``CLICKPULSE_KAFKA_BOOTSTRAP``."""
    from .topics import kafka_admin
    async with kafka_admin(settings):
        pass


def _bootstrap() -> str:
    try:
        return Settings.from_env().kafka_bootstrap
    except ClickpulseError:
        return os.environ.get("CLICKPULSE_KAFKA_BOOTSTRAP", "?")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, map its errors (:func:`error_exit`); the exit code."""
    args = build_parser().parse_args(argv)
    if args.cmd != "worker":
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level == "warning":
        # aiokafka logs every refused connection; the command's own error says it once
        logging.getLogger("aiokafka").addFilter(_quiet_refused_connections)
    try:
        return args.func(args)
    except BrokenPipeError:  # `clickpulse evaluate ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - the one place errors become messages
        if os.environ.get("CLICKPULSE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        message, code = error_exit(err)
        print(f"clickpulse: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
