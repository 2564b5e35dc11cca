"""The bare Faust passthrough (the framework's ceiling) and the Faust tuning it shares with the worker.

``faust_tuning()`` is the one place for the tuned Faust settings: the benchmark's tuned
passthrough uses it, and it is written to be moved into the worker (``create_app`` would pass
``**faust_tuning()`` to ``faust.App``). Until then, ``WORKER_CURRENT`` mirrors what
``src/clickpulse/app.py`` sets today, for the per-message row.

Run as a subprocess by ``benchmarks/pipeline.py``::

    python benchmarks/faust_passthrough.py --mode batch|per-message --app-id ID --in TOPIC \
        --out TOPIC --status FILE --datadir DIR [--tuning JSON] [--take 1000] [--within 0.01] \
        [--send soon|gather]

``batch``: one agent over the (4-partition) input topic, ``stream.take_events(take, within)``,
every value forwarded unchanged with its key, non-awaited (``topic.send_soon``, or ``--send
gather``: ``await topic.send`` for every message, then one ``asyncio.gather`` of the batch's
futures), with ``faust_tuning()`` (+ ``--tuning`` overrides).
``per-message``: ``async for event in stream.events(): await topic.send(...)`` (as the worker's
agents do) with ``WORKER_CURRENT`` and Faust's defaults otherwise.

The status file gets JSON lines: ``{"ready": t}`` after the first rebalance, ``{"first": t}``
when the agent gets its first message (``time.time()``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

#: ``stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S)`` in the batch passthrough.
TAKE_MAX = 1000
#: seconds a partial batch waits for more messages: the latency a batch adds at low rates.
TAKE_WITHIN_S = 0.01


# the worker's own settings: one place, so the passthrough measures the framework as the worker drives it
from clickpulse.app import faust_tuning  # noqa: E402,F401


#: What ``src/clickpulse/app.py`` passes to ``faust.App`` today (beyond topology and web); the
#: per-message passthrough runs with these and Faust's defaults otherwise.
WORKER_CURRENT: dict[str, Any] = {
    "producer_acks": -1,
    "stream_wait_empty": False,
    "broker_commit_every": 1000,
    "broker_commit_interval": 1.0,
}


def faust_env(tuning: dict[str, Any]) -> dict[str, str]:
    """``tuning`` as Faust's own environment variables (``BROKER_MAX_POLL_RECORDS`` ...). Faust
    reads them in ``Settings.__init__`` and they win over ``faust.App(...)`` arguments, which is
    how the benchmark can run the unchanged worker with ``faust_tuning()`` (``--worker-tuned``)."""
    import faust.types.settings.settings as fs

    out = {}
    for name, value in tuning.items():
        env_name = fs.Settings.SETTINGS[name].env_name
        if env_name is None:
            raise KeyError(f"Faust setting {name} has no environment variable")
        out[env_name] = str(value)
    return out


def build_app(args: argparse.Namespace) -> Any:
    import faust

    from benchkit import write_status

    conf = dict(WORKER_CURRENT) if args.mode == "per-message" else {**faust_tuning(), **json.loads(args.tuning)}
    app = faust.App(args.app_id, broker=[f"kafka://{h}" for h in args.bootstrap.split(",")], store="memory://",
                    autodiscover=False, topic_partitions=args.partitions, topic_replication_factor=1,
                    web_enabled=False, datadir=args.datadir, consumer_auto_offset_reset="earliest", **conf)
    src = app.topic(args.topic_in, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                    partitions=args.partitions)
    dst = app.topic(args.topic_out, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                    partitions=args.partitions)
    seen = {"first": False, "ready": False}

    def first() -> None:
        if not seen["first"]:
            seen["first"] = True
            write_status(args.status, first=time.time())

    if args.mode == "per-message":
        @app.agent(src, name="passthrough")
        async def passthrough(stream: Any) -> None:
            async for event in stream.events():
                first()
                m = event.message
                await dst.send(key=m.key, value=m.value)
    elif args.send == "soon":
        @app.agent(src, name="passthrough")
        async def passthrough(stream: Any) -> None:
            async for events in stream.take_events(args.take, within=args.within):
                first()
                for event in events:
                    m = event.message
                    dst.send_soon(key=m.key, value=m.value)
    else:
        @app.agent(src, name="passthrough")
        async def passthrough(stream: Any) -> None:
            async for events in stream.take_events(args.take, within=args.within):
                first()
                futs = [await dst.send(key=e.message.key, value=e.message.value) for e in events]
                await asyncio.gather(*futs)

    @app.on_rebalance_complete.connect
    async def on_rebalance_complete(sender: Any = None, **kwargs: Any) -> None:
        if not seen["ready"]:
            seen["ready"] = True
            write_status(args.status, ready=time.time(), settings=conf)

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("batch", "per-message"), default="batch")
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--app-id", required=True)
    ap.add_argument("--in", dest="topic_in", required=True)
    ap.add_argument("--out", dest="topic_out", required=True)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--status", required=True)
    ap.add_argument("--datadir", required=True)
    ap.add_argument("--tuning", default="{}", help="JSON object overriding faust_tuning() (batch mode)")
    ap.add_argument("--take", type=int, default=TAKE_MAX)
    ap.add_argument("--within", type=float, default=TAKE_WITHIN_S)
    ap.add_argument("--send", choices=("soon", "gather"), default="soon")
    args = ap.parse_args(argv)
    Path(args.datadir).mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = build_app(args)
    from faust.worker import Worker

    sys.argv = [sys.argv[0]]  # Worker parses the command line
    Worker(app, loglevel="warning", logfile=None, quiet=True, override_logging=True).execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
