"""One frozen settings object, read from ``CLICKPULSE_*`` environment variables.

Every field documents its env var, unit and default. ``Settings.from_env()`` is the only place
that reads the environment; everything else receives a ``Settings``.

Examples
--------
>>> s = Settings.from_env({"CLICKPULSE_SESSION_GAP_S": "600"})
>>> s.session_gap_ms
600000
>>> s.topic_raw
'clickpulse.events.raw'
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .keys import MIN_KEY_BYTES, secret_bytes  # noqa: F401 - re-exported: settings validate keys

TIME_MODES = ("live", "replay")
log = logging.getLogger(__name__)

#: the spellings a boolean setting accepts (compared case-insensitively, surrounding blanks ignored)
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

#: ``CLICKPULSE_*`` variables that are not :class:`Settings` fields: read by the local services
#: scripts (``deploy/local/``) or by the command line itself. Name -> (default, meaning).
OTHER_ENV_VARS: dict[str, tuple[str, str]] = {
    "CLICKPULSE_KAFKA_PORT": ("9092", "port of the local Kafka broker (deploy/local/services.sh); also the "
                              "default CLICKPULSE_KAFKA_BOOTSTRAP when that is unset"),
    "CLICKPULSE_KAFKA_CONTROLLER_PORT": ("9093", "port of the local broker's KRaft controller listener"),
    "CLICKPULSE_REDIS_PORT": ("6379", "port of the local Redis; also the default CLICKPULSE_REDIS_URL when that "
                              "is unset"),
    "CLICKPULSE_LOCAL_DIR": (".local", "local scripts: folder of the Kafka jars, broker data and logs"),
    "CLICKPULSE_KAFKA_HEAP": ("768m", "local scripts: the broker's JVM heap"),
    "CLICKPULSE_DEBUG": ("empty", "1: the clickpulse command shows the Python traceback of an error instead of "
                         "the one-line message"),
}


def parse_bool(raw: str, env_name: str) -> bool:
    """``raw`` as a boolean: one of :data:`TRUE_WORDS` or :data:`FALSE_WORDS`, any case.

    Raises
    ------
    ConfigError
        Any other value (``ture``, ``2``, empty): a typo must not silently mean false.
    """
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{env_name}={raw!r} is not a boolean: use true/false, 1/0, yes/no or on/off")


def unknown_env_vars(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``CLICKPULSE_*`` names in ``environ`` that no setting or script reads, each with the
    closest known name (:func:`difflib.get_close_matches` on the part after ``CLICKPULSE_``, ratio >= 0.6) or ``None``, sorted."""
    known = set(ENV_VARS) | set(OTHER_ENV_VARS)
    tails = {n.removeprefix("CLICKPULSE_"): n for n in known}  # the shared prefix would make all look close
    out = []
    for name in sorted(environ):
        if name.startswith("CLICKPULSE_") and name not in known:
            close = difflib.get_close_matches(name.removeprefix("CLICKPULSE_"), tails, n=1, cutoff=0.6)
            out.append((name, tails[close[0]] if close else None))
    return out


_warned: set[str] = set()


def warn_unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """Log a warning (once per process and name) for each unknown ``CLICKPULSE_*`` variable;
    returns the warnings of this call."""
    msgs = []
    for name, close in unknown_env_vars(environ):
        if name in _warned:
            continue
        _warned.add(name)
        msgs.append(f"{name} is not a clickpulse setting and is ignored"
                    + (f" (did you mean {close}?)" if close else ""))
        log.warning("%s", msgs[-1])
    return msgs


def _check_redis_url(url: str) -> None:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    ok = parts.scheme in ("redis", "rediss") and bool(parts.hostname) or parts.scheme == "unix" and bool(parts.path)
    if not ok:
        raise ConfigError(f"CLICKPULSE_REDIS_URL must be a URL such as redis://127.0.0.1:6379/0 (schemes redis://, "
                          f"rediss://, unix://), or empty to disable Redis; got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a non-numeric or out-of-range port
    except ValueError as err:
        raise ConfigError(f"CLICKPULSE_REDIS_URL {url!r}: {err}") from err


def _check_bootstrap(value: str) -> None:
    for item in value.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"CLICKPULSE_KAFKA_BOOTSTRAP must be host:port[,host:port] (no scheme), e.g. "
                              f"127.0.0.1:9092; got {value!r}")


def _env(name: str) -> str:
    return "CLICKPULSE_" + name.upper()


@dataclass(frozen=True)
class Settings:
    """All clickpulse settings. Env var = ``CLICKPULSE_`` + field name in upper case.

    Attributes
    ----------
    kafka_bootstrap : str
        ``CLICKPULSE_KAFKA_BOOTSTRAP``; ``host:port[,host:port]``. Default ``127.0.0.1:9092``
        (the local embedded broker of ``deploy/local/kafka.sh``), or ``127.0.0.1:$CLICKPULSE_KAFKA_PORT``
        when only the local scripts' port variable is set.
    redis_url : str
        ``CLICKPULSE_REDIS_URL``; default ``redis://127.0.0.1:6379/0`` (port from
        ``CLICKPULSE_REDIS_PORT`` when only that is set). Empty disables Redis.
    namespace : str
        ``CLICKPULSE_NAMESPACE``; prefix of every topic, of the Faust app id (consumer group) and
        of Redis keys. Default ``clickpulse``.
    partitions : int
        ``CLICKPULSE_PARTITIONS``; partitions of the raw and valid topics and of the state
        table's changelog (they must be equal: the table is co-partitioned with the stream).
        Also of the actions, segments and privacy topics. Default 4. An existing topic with another
        count is refused at start (``ConfigError``): partitions cannot shrink, and growing them
        would move users between partitions away from their state.
    replication_factor : int
        ``CLICKPULSE_REPLICATION_FACTOR``; copies of every partition kept by the brokers (every
        clickpulse topic and the Faust table changelogs). 1 for a single local broker (the
        default); 3 in production, so one broker can fail without losing data. Must not exceed
        the number of brokers (``ConfigError`` when topics are created). Applies to topics
        created from then on; existing topics keep theirs.
    standby_replicas : int
        ``CLICKPULSE_STANDBY_REPLICAS``; how many other workers keep a warm copy of each state
        table partition (Faust ``table_standby_replicas``): when a worker dies, a standby takes
        over without replaying the changelog from the start. Useful with 2 or more workers;
        each standby costs that partition's state again in disk and memory. Default 0.
    time_mode : str
        ``CLICKPULSE_TIME_MODE``; ``live`` (an idle partition's watermark follows the wall clock)
        or ``replay`` (event time advances only with events). Default ``live``.
    allowed_lateness_s : float
        ``CLICKPULSE_ALLOWED_LATENESS_S``; seconds. Watermark = max event time seen on the
        partition − this. Default 60.
    idle_timeout_s : float
        ``CLICKPULSE_IDLE_TIMEOUT_S``; seconds without events after which, in live mode, a
        partition's event-time clock follows ``wall clock − idle_timeout_s``. Default 5.
    max_future_skew_s : float
        ``CLICKPULSE_MAX_FUTURE_SKEW_S``; seconds. An event time further than this in the future
        of the message's receive time is clamped to the receive time (and counted). Default 300.
    session_gap_s : float
        ``CLICKPULSE_SESSION_GAP_S``; seconds of inactivity that end a session. Default 1800
        (30 min, the GA / Segment / Snowplow convention).
    timezone : str
        ``CLICKPULSE_TIMEZONE``; the site time zone, an IANA name (``America/New_York``). "Day"
        windows (``count.X["7d"]``, ``count.X["today"]``), ``category_views``, ``local.*`` in
        rules and ``once_per: day`` follow its local days, DST-correct (a local day can last 23 or
        25 hours; :mod:`clickpulse.state.localtime`). Default ``UTC``. Changing it on a running
        namespace re-labels the day buckets already stored (up to a day's shift in ``7d``).
    engagement_weights : str
        ``CLICKPULSE_ENGAGEMENT_WEIGHTS``; points per engagement signal overriding the defaults of
        :data:`clickpulse.features.engagement.DEFAULT_WEIGHTS`, as ``name=points`` pairs
        separated by commas (``purchase=12,hover=0``; ``dwell`` is per minute). Default empty.
    model_min_class_examples : int
        ``CLICKPULSE_MODEL_MIN_CLASS_EXAMPLES``; a model's actions (``high_intent``,
        ``churn_risk``) are published only once the model in use has learned at least this many
        labeled examples of each class: a model that never saw a churner scores noise. Scores
        are still computed and served. Default 10; 0 disables the check.
    rules_path : str
        ``CLICKPULSE_RULES_PATH``; the rules file (segments and triggers, YAML + CEL, see
        :mod:`clickpulse.rules.ruleset`). Empty (the default): the packaged default rules
        (``src/clickpulse/rules/default_rules.yaml``, also ``deploy/rules.example.yaml``);
        ``none``: no rules (no segments, no rule actions). Cart abandonment and its delay are
        rules (default: 30 min after the last ``add_to_cart``).
    rules_poll_s : float
        ``CLICKPULSE_RULES_POLL_S``; seconds between checks of the rules file for changes (a
        changed valid file is hot-reloaded; an invalid one is rejected and the previous rules
        keep running). Default 5.
    assume_consent : str
        ``CLICKPULSE_ASSUME_CONSENT``; comma-separated consent purposes taken as granted for a
        user who never sent a ``consent`` event (e.g. ``marketing`` for a source that collects
        consent upstream). Default empty: opt-in, a ``requires_consent`` trigger fires only after
        the user's ``consent`` event granted the purpose.
    bot_max_cart_adds, bot_cart_window_s, bot_max_events, bot_events_window_s : int, float
        ``CLICKPULSE_BOT_*``; a user with more than ``bot_max_cart_adds`` ``add_to_cart`` within
        ``bot_cart_window_s`` seconds of event time, or more than ``bot_max_events`` events within
        ``bot_events_window_s``, is a bot (as is one with a known crawler user agent): it fires no
        rule action. Defaults 20 in 10 s, 300 in 60 s (:mod:`clickpulse.rules.bots`).
    max_event_bytes : int
        ``CLICKPULSE_MAX_EVENT_BYTES``; bytes. Larger raw messages go to the dead-letter topic.
        Default 65536 (64 KiB).
    max_money : float
        ``CLICKPULSE_MAX_MONEY``; units of the event's ``currency``. An event whose numeric money
        field (``properties.price``, ``revenue``, ``total``, ``value``) is not finite or has an
        absolute value above this goes to the dead-letter topic (``out_of_range``). Default 1e9.
    max_quantity : int
        ``CLICKPULSE_MAX_QUANTITY``; units. An event whose ``properties.quantity`` is above this
        goes to the dead-letter topic (``out_of_range``). Default 10,000 (the schema's own bound
        is 100,000).
    max_state_bytes : int
        ``CLICKPULSE_MAX_STATE_BYTES``; bytes. The engine's last resort against a user's state
        outgrowing a Kafka message: a step that would write a state larger than this rolls the
        user's events back one by one and dead-letters each event that would take it over
        (``state_too_large``; the user's previous state stands, nothing is produced). Default
        262144 (256 KiB), well below the producer's maximum request size (1 MiB); the per-user
        caps of :mod:`clickpulse.state.user` keep real states far smaller (a few KiB).
    dlq_max_payload_bytes : int
        ``CLICKPULSE_DLQ_MAX_PAYLOAD_BYTES``; bytes of the original value copied into a
        dead-letter record (the full value stays at its topic/partition/offset). Default 65536.
    dedup_ids_per_user : int
        ``CLICKPULSE_DEDUP_IDS_PER_USER``; how many recent event ids each user keeps for
        de-duplication. Default 32.
    user_retention_s : float
        ``CLICKPULSE_USER_RETENTION_S``; seconds. A user with no event for this long (event time,
        against the partition watermark) and no pending rule timer loses its behavioral state
        (windows, session, cart, traits, model and rule bookkeeping; checked every 5 min) and
        keeps only a small durable record: identifiers, consent decisions and lifetime totals
        (see ``dormant_retention_s``). Also the TTL (wall clock) of the user's Redis profile.
        Default 2,592,000 (30 days; longer than the 14-day churn horizon).
    dormant_retention_s : float
        ``CLICKPULSE_DORMANT_RETENTION_S``; seconds of event time a user's durable record
        (consent, lifetime orders and revenue) is kept after its last event; after that the user
        is deleted from the table (a changelog tombstone). Erasure (``clickpulse privacy erase``)
        deletes it at once. Default 63,072,000 (730 days).
    redis_flush_interval_s : float
        ``CLICKPULSE_REDIS_FLUSH_INTERVAL_S``; seconds between write-behind flushes. Default 0.5.
    redis_max_pending : int
        ``CLICKPULSE_REDIS_MAX_PENDING``; profiles waiting for Redis; beyond it the oldest are
        dropped (and counted) rather than blocking the stream. Default 100000.
    redis_refill_check_s : float
        ``CLICKPULSE_REDIS_REFILL_CHECK_S``; seconds between the worker's checks that Redis still
        holds its partitions' profiles (sentinel ``<namespace>:epoch:<partition>``); a partition
        whose sentinel is gone has every profile rewritten from the state table
        (:class:`clickpulse.serving.redis_sink.ProfileRefill`). Default 5.
    redis_refill_rate : float
        ``CLICKPULSE_REDIS_REFILL_RATE``; profiles per second a refill writes at most (it shares the
        worker's event loop with the stream). Default 5000.
    api_keys : str
        ``CLICKPULSE_API_KEYS``; comma-separated keys accepted by ``clickpulse api`` (header
        ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``), each at least 16 characters.
        Empty (the default): ``clickpulse api`` refuses to start. Never logged or shown in ``repr``.
    api_host, api_port : str, int
        ``CLICKPULSE_API_HOST`` / ``CLICKPULSE_API_PORT``; where ``clickpulse api`` listens.
        Defaults ``127.0.0.1``, 6068.
    web_port : int
        ``CLICKPULSE_WEB_PORT``; the worker's HTTP port serving ``/metrics``. Default 6066.
    web_host : str
        ``CLICKPULSE_WEB_HOST``; default ``127.0.0.1``.
    kafka_session_timeout_s : float
        ``CLICKPULSE_KAFKA_SESSION_TIMEOUT_S``; seconds without heartbeats before the group
        coordinator declares a worker dead and moves its partitions (after a crash, the restarted
        worker waits this long for them). Default 30.
    models_enabled : bool
        ``CLICKPULSE_MODELS_ENABLED``; score intent/churn and emit training examples. Default true.
        Booleans accept ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case); anything else
        is refused (``ConfigError``).
    intent_pipeline, churn_pipeline : str
        ``CLICKPULSE_INTENT_PIPELINE`` / ``CLICKPULSE_CHURN_PIPELINE``; River pipeline names
        (:data:`clickpulse.models.online.PIPELINES`). Default ``logreg`` (scaler + logistic regression).
    model_seed : int
        ``CLICKPULSE_MODEL_SEED``; seed of the pipelines. Default 42.
    intent_score_every : int
        ``CLICKPULSE_INTENT_SCORE_EVERY``; intent is scored at add_to_cart, checkout_start and every
        N-th event of a session. Default 5.
    intent_threshold, churn_threshold : float
        ``CLICKPULSE_INTENT_THRESHOLD`` (0.8) / ``CLICKPULSE_CHURN_THRESHOLD`` (0.7); scores in
        [0, 1] at or above which ``high_intent`` / ``churn_risk`` fire (and the threshold of the
        F1/precision/recall in progressive validation).
    churn_horizon_days : float
        ``CLICKPULSE_CHURN_HORIZON_DAYS``; days: churn = no return within this. Default 14.
    churn_cooldown_days : float
        ``CLICKPULSE_CHURN_COOLDOWN_DAYS``; days between two churn_risk actions for a user. Default 7.
    pending_per_user, pending_total : int
        ``CLICKPULSE_PENDING_PER_USER`` (8) / ``CLICKPULSE_PENDING_TOTAL`` (1,000,000); bounds of the
        unlabeled intent predictions buffer.
    pending_max_age_s : float
        ``CLICKPULSE_PENDING_MAX_AGE_S``; seconds of event time after which an unlabeled prediction
        expires. Default 21600 (6 h).
    snapshot_every : int
        ``CLICKPULSE_SNAPSHOT_EVERY``; the trainer publishes a snapshot after this many new
        examples (or ``snapshot_interval_s``). Default 500.
    snapshot_interval_s : float
        ``CLICKPULSE_SNAPSHOT_INTERVAL_S``; seconds. Default 5.
    validation_window : int
        ``CLICKPULSE_VALIDATION_WINDOW``; examples in the rolling progressive-validation window. Default 1000.
    snapshot_key : str
        ``CLICKPULSE_SNAPSHOT_KEY``; the secret that authenticates model snapshots. The trainer
        signs every snapshot with HMAC-SHA256 under this key, and a worker (or a resuming
        trainer) unpickles a snapshot only after its signature checks out; anything else is
        rejected (``clickpulse_model_snapshots_rejected_total{reason}``) and the current model
        keeps serving (:mod:`clickpulse.models.registry`). Either hex (an even number of at least
        32 hex digits, decoded to bytes) or any other text (its UTF-8 bytes); at least 16
        characters, e.g. ``openssl rand -hex 32``. Set the same value on the trainer and on
        every worker. Default empty: no key is derived or shared over Kafka; instead the key is
        read from ``<data_dir>/snapshot.key``, which whichever process needs it first creates
        (64 random hex digits, mode 0600; a key file readable by group or others is refused).
        So a worker and a trainer started from the same folder (``clickpulse demo``, the local
        scripts, the integration tests) agree without configuration, while processes that do not
        share ``data_dir`` (containers, hosts) each get their own key and reject each other's
        snapshots until this is set: the default fails closed, never open. Never logged or
        shown in ``repr``.
    trainer_web_port : int
        ``CLICKPULSE_TRAINER_WEB_PORT``; the trainer's ``/metrics`` port. Default 6067.
    engagement_half_life_s : float
        ``CLICKPULSE_ENGAGEMENT_HALF_LIFE_S``; seconds after which an event's engagement points
        count half (exponential recency decay). Default 604800 (7 days).
    data_dir : str
        ``CLICKPULSE_DATA_DIR``; the worker's local folder (Faust data dir: the RocksDB state store
        lives under it). Default ``.local/worker-data``.
    state_store : str
        ``CLICKPULSE_STATE_STORE``; where the worker keeps the user-state table: ``rocksdb``
        (Faust's RocksDB store through ``rocksdict``, on disk under ``data_dir``: memory stays
        bounded however many users there are) or ``memory`` (the whole table in process memory).
        Either way the table's changelog topic is the source of truth a restarted worker
        recovers from. Default ``rocksdb``.
    state_cache_users : int
        ``CLICKPULSE_STATE_CACHE_USERS``; decoded states of recently active users kept in memory
        by the engine (least recently used evicted), so consecutive events of a user decode its
        state once. Default 5000.
    batch_max_events : int
        ``CLICKPULSE_BATCH_MAX_EVENTS``; the most events one engine step takes (the agents read
        the stream with Faust's ``take_events``). Default 1000.
    batch_within_s : float
        ``CLICKPULSE_BATCH_WITHIN_S``; seconds an agent waits to fill a batch before processing
        what it has (the latency floor under light load). Default 0.02.
    raw_keyed : bool
        ``CLICKPULSE_RAW_KEYED``; producers key the raw topic by the identity key (``user_id``,
        else ``"anon:" + anonymous_id``, murmur2 partitioner as Kafka's default): the worker then
        validates and processes in one hop, and re-routes through the valid topic only the
        events whose key is not their identity key. Default false (two hops: ingest re-keys every
        event onto the valid topic).
    control_key : str
        ``CLICKPULSE_CONTROL_KEY``; the secret that signs control messages (``replay --flush``'s
        end of input) on the raw topic (HMAC-SHA256, :mod:`clickpulse.events.control`). Empty
        (the default): every control message on the raw topic is dead-lettered as
        ``forged_control`` — no producer can close event time. ``clickpulse demo`` and the
        integration tests generate one per run. Give the worker and the replaying tool the same
        value; never give it to ordinary producers.
    model_actions_consent : str
        ``CLICKPULSE_MODEL_ACTIONS_CONSENT``; the consent purpose a model action (``high_intent``,
        ``churn_risk``) requires, as a rule's ``requires_consent`` does: the user's latest
        ``consent`` event decides, else ``CLICKPULSE_ASSUME_CONSENT``. Empty: no consent needed.
        Bots never get a model action either way. Default ``marketing``.
    max_in_flight_batches : int
        ``CLICKPULSE_MAX_IN_FLIGHT_BATCHES``; batches whose messages may still await the
        broker's acknowledgement before the agent waits (backpressure: the producer backlog,
        and so the commit delay, stays bounded). Default 4.
    pii_policy_path : str
        ``CLICKPULSE_PII_POLICY_PATH``; the PII policy file (YAML, :mod:`clickpulse.events.pii`)
        applied to every event at ingest, before any topic: allowlists of ``properties``,
        ``context`` and identify ``traits`` keys (anything else is dropped), fields kept as a
        keyed hash, and whether dead-letter records keep the original bytes. Empty (the
        default): the packaged default policy (``src/clickpulse/events/default_pii_policy.yaml``,
        explained in ``deploy/pii-policy.example.yaml``), which keeps what clickpulse needs and
        drops e-mail, phone, names, IP, URLs and search text, hashes nothing and keeps no
        dead-letter payload. An invalid file stops the worker at start (``ConfigError``).
    pii_hash_key : str
        ``CLICKPULSE_PII_HASH_KEY``; the secret of the PII policy's HMAC-SHA256 hashing (hashed
        fields become ``"h1:"`` + 32 hex digits, the same for the same value in every event).
        Either hex (an even number of at least 32 hex digits, decoded to bytes) or any other
        text (its UTF-8 bytes); at least 16 bytes, e.g. ``openssl rand -hex 32``. Default empty:
        a policy that hashes anything is then rejected at start (nothing is hashed without a
        key). Changing it changes every hash, so hashed identifiers no longer join with those
        made under the old key. Never logged or shown in ``repr``.
    delivery_dedup_ttl_s : float
        ``CLICKPULSE_DELIVERY_DEDUP_TTL_S``; seconds ``clickpulse deliver`` remembers a delivered
        ``action_id`` in Redis (``<namespace>:delivered:<action_id>``). Keep it at least the
        retention of the actions topic (7 days), so an action re-read from anywhere on the topic
        is still recognised (the adapter warns at start when it is shorter). Default 604800
        (7 days) (:mod:`clickpulse.delivery`).
    delivery_batch_max : int
        ``CLICKPULSE_DELIVERY_BATCH_MAX``; the most actions ``clickpulse deliver`` takes per poll:
        one fsync (jsonl), one Redis round trip per step and one offset commit per batch.
        Default 500.
    delivery_webhook_attempts : int
        ``CLICKPULSE_DELIVERY_WEBHOOK_ATTEMPTS``; tries of one webhook POST (the first included)
        on a connection error, a timeout, 408, 425, 429 or 5xx; then the action goes to
        ``<namespace>.actions.dlq``. Other non-2xx answers are not retried. Default 5.
    delivery_webhook_timeout_s : float
        ``CLICKPULSE_DELIVERY_WEBHOOK_TIMEOUT_S``; seconds for one webhook POST (connect, send,
        answer). Default 10.
    delivery_webhook_backoff_s, delivery_webhook_backoff_max_s : float
        ``CLICKPULSE_DELIVERY_WEBHOOK_BACKOFF_S`` (0.5) / ``CLICKPULSE_DELIVERY_WEBHOOK_BACKOFF_MAX_S``
        (30); seconds: the wait before the first retry, doubling (with jitter) up to the maximum;
        a ``Retry-After`` answer is honoured up to the maximum.
    collector_host, collector_port : str, int
        ``CLICKPULSE_COLLECTOR_HOST`` (``127.0.0.1``) / ``CLICKPULSE_COLLECTOR_PORT`` (8088): where
        ``clickpulse collector`` (the Segment/RudderStack HTTP tracking API,
        :mod:`clickpulse.collector`) listens.
    collector_write_keys : str
        ``CLICKPULSE_COLLECTOR_WRITE_KEYS``; comma-separated write keys the collector accepts (HTTP
        Basic user name, or ``writeKey`` in the body); any other request gets 401. Empty (the
        default): the collector refuses to start.
    collector_max_event_bytes : int
        ``CLICKPULSE_COLLECTOR_MAX_EVENT_BYTES``; bytes of one event as published (Segment's 32 KB,
        32768); a bigger one fails its request with 400. At most ``CLICKPULSE_MAX_EVENT_BYTES``.
    collector_max_batch_bytes : int
        ``CLICKPULSE_COLLECTOR_MAX_BATCH_BYTES``; bytes of one request body after gzip decoding
        (Segment's 500 KB, 512000); a bigger one gets 400.
    collector_max_batch_events : int
        ``CLICKPULSE_COLLECTOR_MAX_BATCH_EVENTS``; events in one batch (Segment's 2500); more get 400.
    collector_ack_timeout_s : float
        ``CLICKPULSE_COLLECTOR_ACK_TIMEOUT_S``; seconds a request waits for Kafka to acknowledge all
        its events before it is answered 503 (then retried by the SDK). Default 10.
    collector_retry_after_s : int
        ``CLICKPULSE_COLLECTOR_RETRY_AFTER_S``; the ``Retry-After`` of a 503 (Kafka unavailable), in
        seconds. Default 5.
    collector_linger_ms : int
        ``CLICKPULSE_COLLECTOR_LINGER_MS``; the producer's ``linger_ms``: how long it waits to fill
        a batch of concurrent requests' events. Default 2.
    collector_cors_origins : str
        ``CLICKPULSE_COLLECTOR_CORS_ORIGINS``; ``Access-Control-Allow-Origin`` for browser SDKs:
        ``*`` (the default), a comma-separated list of origins, or empty for no CORS headers.
    collector_event_loop : str
        ``CLICKPULSE_COLLECTOR_EVENT_LOOP``; ``auto`` (the default: uvloop when installed, the
        ``collector`` extra), ``uvloop`` (required) or ``asyncio``.
    collector_body_timeout_s : float
        ``CLICKPULSE_COLLECTOR_BODY_TIMEOUT_S``; seconds for the whole request body to arrive
        once the headers are in; a slower body gets 408 and its connection is closed. Default 10.
    collector_idle_timeout_s : float
        ``CLICKPULSE_COLLECTOR_IDLE_TIMEOUT_S``; seconds a connection may stay idle between
        requests, or take to send its request line and headers, before it is closed (aiohttp's
        ``keepalive_timeout``). Default 15.
    collector_max_in_flight : int
        ``CLICKPULSE_COLLECTOR_MAX_IN_FLIGHT``; tracking requests handled at once (requests; each
        holds at most ``CLICKPULSE_COLLECTOR_MAX_BATCH_BYTES`` of body, so this bounds body
        memory); beyond, 503 ``overloaded`` with ``Retry-After`` at once. Default 512.
    collector_max_connections : int
        ``CLICKPULSE_COLLECTOR_MAX_CONNECTIONS``; open connections (connections; each is a file
        descriptor: keep it under ``ulimit -n``, a warning is logged otherwise); a connection
        beyond is answered 503 and closed on accept. Default 10000.
    recs_enabled : bool
        ``CLICKPULSE_RECS_ENABLED``; the worker learns item-to-item co-occurrence from its own
        partitions' sessions and puts recommendations in the actions of ``recs_triggers`` and on
        the profile (:mod:`clickpulse.recs`, ``docs/recommendations.md``). Default true.
    recs_half_life_s : float
        ``CLICKPULSE_RECS_HALF_LIFE_S``; event-time half-life of a co-occurrence, seconds (0: no
        decay). Default 604800 (7 days).
    recs_neighbours : int
        ``CLICKPULSE_RECS_NEIGHBOURS``; neighbours kept per item (up to 1.5x between prunings).
        Default 20.
    recs_max_items : int
        ``CLICKPULSE_RECS_MAX_ITEMS``; items kept per worker (least recently updated evicted).
        Default 50000 (at most ≈ 4.7 KB per item with 20 neighbours: ≈ 235 MB; see
        :mod:`clickpulse.recs.cooccurrence`).
    recs_context : int
        ``CLICKPULSE_RECS_CONTEXT``; the most recent session items a view is paired with and a
        recommendation is computed from. Default 10.
    recs_k : int
        ``CLICKPULSE_RECS_K``; recommendations per action payload and profile. Default 5.
    recs_triggers : str
        ``CLICKPULSE_RECS_TRIGGERS``; comma-separated trigger names whose action payloads get
        ``recommendations``. Default ``cart_abandonment,browse_abandonment``.
    segment_sizes_interval_s : float
        ``CLICKPULSE_SEGMENT_SIZES_INTERVAL_S``; seconds. Each worker publishes its partitions'
        segment member counts to the compacted ``<ns>.segment-sizes`` topic when they changed, at
        most this often (and after every rebalance); every worker adds the other partitions'
        latest counts to its own, so ``min_size`` applies to a segment's global size. With
        several workers the gate therefore lags the other workers' counts by up to about this
        long (docs/scaling.md). Default 2.
    health_poll_s : float
        ``CLICKPULSE_HEALTH_POLL_S``; seconds between the worker's checks of Kafka (which also
        poll its consumer lag) and Redis for ``/ready`` and ``clickpulse_dependency_up``;
        ``/ready`` fails when a check failed or none succeeded for 3 periods (at least 15 s).
        Default 5.
    stall_timeout_s : float
        ``CLICKPULSE_STALL_TIMEOUT_S``; seconds. An input partition of the worker with lag that
        makes no progress this long (its committed offset does not move and no new record of it
        is delivered) is stalled: the worker logs its consumer state, counts
        ``clickpulse_input_stalls_total`` and exits with code 75 for its supervisor to restart it
        (docs/operations.md). Checked at each ``CLICKPULSE_HEALTH_POLL_S``. 0 turns it off.
        Default 180.
    """

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "clickpulse"
    partitions: int = 4
    replication_factor: int = 1
    standby_replicas: int = 0
    time_mode: str = "live"
    allowed_lateness_s: float = 60.0
    idle_timeout_s: float = 5.0
    max_future_skew_s: float = 300.0
    session_gap_s: float = 1800.0
    timezone: str = "UTC"
    rules_path: str = ""
    rules_poll_s: float = 5.0
    assume_consent: str = ""
    bot_max_cart_adds: int = 20
    bot_cart_window_s: float = 10.0
    bot_max_events: int = 300
    bot_events_window_s: float = 60.0
    max_event_bytes: int = 65536
    max_money: float = 1e9
    max_quantity: int = 10_000
    max_state_bytes: int = 262_144
    dlq_max_payload_bytes: int = 65536
    dedup_ids_per_user: int = 32
    user_retention_s: float = 30 * 86400.0
    dormant_retention_s: float = 730 * 86400.0
    redis_flush_interval_s: float = 0.5
    redis_max_pending: int = 100_000
    redis_refill_check_s: float = 5.0
    redis_refill_rate: float = 5000.0
    api_keys: str = field(default="", repr=False)
    api_host: str = "127.0.0.1"
    api_port: int = 6068
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    kafka_session_timeout_s: float = 30.0
    models_enabled: bool = True
    intent_pipeline: str = "logreg"
    churn_pipeline: str = "logreg"
    model_seed: int = 42
    model_min_class_examples: int = 10
    intent_score_every: int = 5
    intent_threshold: float = 0.8
    churn_threshold: float = 0.7
    churn_horizon_days: float = 14.0
    churn_cooldown_days: float = 7.0
    pending_per_user: int = 8
    pending_total: int = 1_000_000
    pending_max_age_s: float = 21600.0
    snapshot_every: int = 500
    snapshot_interval_s: float = 5.0
    validation_window: int = 1000
    snapshot_key: str = field(default="", repr=False)
    trainer_web_port: int = 6067
    engagement_half_life_s: float = 604800.0
    engagement_weights: str = ""
    data_dir: str = ".local/worker-data"
    state_store: str = "rocksdb"
    state_cache_users: int = 5_000
    batch_max_events: int = 1000
    batch_within_s: float = 0.02
    raw_keyed: bool = False
    max_in_flight_batches: int = 4
    model_actions_consent: str = "marketing"
    control_key: str = field(default="", repr=False)
    pii_policy_path: str = ""
    pii_hash_key: str = field(default="", repr=False)
    delivery_dedup_ttl_s: float = 7 * 86400.0
    delivery_batch_max: int = 500
    delivery_webhook_attempts: int = 5
    delivery_webhook_timeout_s: float = 10.0
    delivery_webhook_backoff_s: float = 0.5
    delivery_webhook_backoff_max_s: float = 30.0
    collector_host: str = "127.0.0.1"
    collector_port: int = 8088
    collector_write_keys: str = field(default="", repr=False)
    collector_max_event_bytes: int = 32768
    collector_max_batch_bytes: int = 512000
    collector_max_batch_events: int = 2500
    collector_ack_timeout_s: float = 10.0
    collector_retry_after_s: int = 5
    collector_linger_ms: int = 2
    collector_cors_origins: str = "*"
    collector_event_loop: str = "auto"
    collector_body_timeout_s: float = 10.0
    collector_idle_timeout_s: float = 15.0
    collector_max_in_flight: int = 512
    collector_max_connections: int = 10000
    recs_enabled: bool = True
    recs_half_life_s: float = 7 * 86400.0
    recs_neighbours: int = 20
    recs_max_items: int = 50_000
    recs_context: int = 10
    recs_k: int = 5
    recs_triggers: str = "cart_abandonment,browse_abandonment"
    segment_sizes_interval_s: float = 2.0
    health_poll_s: float = 5.0
    stall_timeout_s: float = 180.0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.time_mode not in TIME_MODES:
            raise ConfigError(f"{_env('time_mode')} must be one of {TIME_MODES}, got {self.time_mode!r}")
        for name in ("intent_threshold", "churn_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{_env(name)} must be in [0, 1], got {getattr(self, name)!r}")
        positive = ("intent_score_every", "pending_per_user", "pending_total", "snapshot_every",
                    "validation_window", "churn_horizon_days", "partitions", "session_gap_s", "max_event_bytes", "rules_poll_s",
                    "bot_max_cart_adds", "bot_cart_window_s", "bot_max_events", "bot_events_window_s",
                    "dedup_ids_per_user", "redis_flush_interval_s", "idle_timeout_s", "batch_max_events",
                    "batch_within_s", "max_in_flight_batches", "max_money", "max_quantity", "max_state_bytes",
                    "replication_factor", "redis_refill_check_s", "redis_refill_rate",
                    "segment_sizes_interval_s", "health_poll_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("delivery_dedup_ttl_s", "delivery_batch_max", "delivery_webhook_attempts",
                     "delivery_webhook_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_env(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("delivery_webhook_backoff_s", "delivery_webhook_backoff_max_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{_env(name)} must be >= 0, got {getattr(self, name)!r}")
        for name in ("collector_port", "collector_max_event_bytes", "collector_max_batch_bytes",
                     "collector_max_batch_events", "collector_ack_timeout_s", "collector_retry_after_s",
                     "collector_body_timeout_s", "collector_idle_timeout_s", "collector_max_in_flight",
                     "collector_max_connections"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_env(name)} must be > 0, got {getattr(self, name)!r}")
        if self.collector_event_loop not in ("auto", "uvloop", "asyncio"):
            raise ConfigError(f"{_env('collector_event_loop')} must be auto, uvloop or asyncio, "
                              f"got {self.collector_event_loop!r}")
        if not 0 <= self.stall_timeout_s < float("inf"):
            raise ConfigError(f"{_env('stall_timeout_s')} must be >= 0 (0: off), got {self.stall_timeout_s!r}")
        if self.collector_linger_ms < 0:
            raise ConfigError(f"{_env('collector_linger_ms')} must be >= 0, got {self.collector_linger_ms!r}")
        if self.collector_max_event_bytes > min(self.max_event_bytes, self.collector_max_batch_bytes):
            raise ConfigError(f"{_env('collector_max_event_bytes')}={self.collector_max_event_bytes} must be at most "
                              f"{_env('max_event_bytes')} ({self.max_event_bytes}, what the worker accepts) and "
                              f"{_env('collector_max_batch_bytes')} ({self.collector_max_batch_bytes})")
        if not 0 < self.max_money < float("inf"):  # NaN or inf would disable the bound
            raise ConfigError(f"{_env('max_money')} must be a finite number > 0, got {self.max_money!r}")
        if self.kafka_session_timeout_s < 6:
            raise ConfigError(f"{_env('kafka_session_timeout_s')} must be >= 6 (the broker's "
                              f"group.min.session.timeout.ms), got {self.kafka_session_timeout_s!r}")
        for name in ("allowed_lateness_s", "max_future_skew_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_env(name)} must be >= 0, got {getattr(self, name)!r}")
        try:
            from .features.engagement import EngagementConfig
            EngagementConfig.from_settings(self)
        except ValueError as err:
            raise ConfigError(f"{_env('engagement_weights')}: {err}") from err
        if self.state_store not in ("rocksdb", "memory"):
            raise ConfigError(f"{_env('state_store')} must be 'rocksdb' or 'memory', got {self.state_store!r}")
        if self.standby_replicas < 0:
            raise ConfigError(f"{_env('standby_replicas')} must be >= 0, got {self.standby_replicas!r}")
        for name in ("web_port", "trainer_web_port", "collector_port", "api_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(f"{_env(name)} must be a TCP port in 1..65535, got {getattr(self, name)!r}")
        _check_bootstrap(self.kafka_bootstrap)
        if self.redis_url:
            _check_redis_url(self.redis_url)
        if self.state_cache_users < 0:
            raise ConfigError(f"{_env('state_cache_users')} must be >= 0, got {self.state_cache_users!r}")
        if self.snapshot_key and len(self.snapshot_key.strip()) < 16:
            raise ConfigError(f"{_env('snapshot_key')} must be at least 16 characters (e.g. `openssl rand -hex 32`), "
                              f"got {len(self.snapshot_key.strip())}")
        from .state.localtime import check_timezone
        try:
            check_timezone(self.timezone)
        except ValueError as err:
            raise ConfigError(f"{_env('timezone')}: {err}") from err
        if any(len(k) < 16 for k in self.api_key_list):
            raise ConfigError(f"{_env('api_keys')}: every key must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        if not self.namespace or not all(c.isalnum() or c in "-_." for c in self.namespace):
            raise ConfigError(f"{_env('namespace')} must be non-empty [A-Za-z0-9._-], got {self.namespace!r}")
        for name in ("recs_neighbours", "recs_max_items", "recs_context", "recs_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_env(name)} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.recs_half_life_s < float("inf"):
            raise ConfigError(f"{_env('recs_half_life_s')} must be a finite number >= 0, got {self.recs_half_life_s!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``CLICKPULSE_*`` variables (``os.environ`` by default).

        Raises
        ------
        ConfigError
            A variable cannot be converted to its field's type (a boolean must be one of
            :data:`TRUE_WORDS` / :data:`FALSE_WORDS`), or a value is out of range.

        Unknown ``CLICKPULSE_*`` variables (typos) are logged as warnings, with the closest
        known name (:func:`warn_unknown_env_vars`).
        """
        env = os.environ if environ is None else environ
        warn_unknown_env_vars(env)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(_env(f.name))
            if raw is None:
                continue
            kind = type(f.default)
            if kind is bool:
                values[f.name] = parse_bool(raw, _env(f.name))
                continue
            try:
                values[f.name] = kind(raw)
            except ValueError as err:
                raise ConfigError(f"{_env(f.name)}={raw!r} is not a valid {kind.__name__}") from err
        # the local services scripts take CLICKPULSE_KAFKA_PORT / CLICKPULSE_REDIS_PORT; without an
        # explicit address, connect to where those scripts put the services
        for name in ("CLICKPULSE_KAFKA_PORT", "CLICKPULSE_REDIS_PORT"):
            if env.get(name) and not (env[name].strip().isdigit() and 0 < int(env[name]) < 65536):
                raise ConfigError(f"{name} must be a TCP port in 1..65535, got {env[name]!r}")
        if "kafka_bootstrap" not in values and env.get("CLICKPULSE_KAFKA_PORT"):
            values["kafka_bootstrap"] = f"127.0.0.1:{env['CLICKPULSE_KAFKA_PORT']}"
        if "redis_url" not in values and env.get("CLICKPULSE_REDIS_PORT"):
            values["redis_url"] = f"redis://127.0.0.1:{env['CLICKPULSE_REDIS_PORT']}/0"
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # derived values -------------------------------------------------------------------
    @property
    def app_id(self) -> str:
        """Faust app id = Kafka consumer group of the worker."""
        return f"{self.namespace}-worker"

    @property
    def topic_raw(self) -> str:
        return f"{self.namespace}.events.raw"

    @property
    def topic_valid(self) -> str:
        return f"{self.namespace}.events.valid"

    @property
    def topic_dlq(self) -> str:
        return f"{self.namespace}.events.dlq"

    @property
    def topic_actions(self) -> str:
        return f"{self.namespace}.actions"

    @property
    def topic_training(self) -> str:
        return f"{self.namespace}.training"

    @property
    def topic_segments(self) -> str:
        return f"{self.namespace}.segments"

    @property
    def topic_experiments(self) -> str:
        """Experiment exposures and attributed conversions (``schemas/experiment.v1.json``)."""
        return f"{self.namespace}.experiments"

    @property
    def topic_models(self) -> str:
        return f"{self.namespace}.models"

    @property
    def topic_quarantine(self) -> str:
        return f"{self.namespace}.quarantine"

    @property
    def state_table(self) -> str:
        return "users"

    @property
    def allowed_lateness_ms(self) -> int:
        return int(self.allowed_lateness_s * 1000)

    @property
    def idle_timeout_ms(self) -> int:
        return int(self.idle_timeout_s * 1000)

    @property
    def max_future_skew_ms(self) -> int:
        return int(self.max_future_skew_s * 1000)

    @property
    def session_gap_ms(self) -> int:
        return int(self.session_gap_s * 1000)

    @property
    def rules_file(self) -> str | None:
        """The rules file to load (``None`` for ``CLICKPULSE_RULES_PATH=none``)."""
        if self.rules_path.strip().lower() == "none":
            return None
        if self.rules_path.strip():
            return self.rules_path
        from pathlib import Path
        return str(Path(__file__).parent / "rules" / "default_rules.yaml")

    @property
    def assumed_consent(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.assume_consent.split(",") if p.strip())

    @property
    def dormant_retention_ms(self) -> int:
        return int(self.dormant_retention_s * 1000)

    @property
    def changelog_topic(self) -> str:
        """The state table's changelog (Faust names it ``<app id>-<table>-changelog``)."""
        return f"{self.app_id}-{self.state_table}-changelog"

    @property
    def topic_segment_sizes(self) -> str:
        """The compacted topic of the partitions' segment member counts (one partition)."""
        return f"{self.namespace}.segment-sizes"

    @property
    def topic_privacy(self) -> str:
        return f"{self.namespace}.privacy"

    @property
    def topic_privacy_audit(self) -> str:
        return f"{self.namespace}.privacy.audit"

    @property
    def topic_identity(self) -> str:
        """Merge records of identity stitching (a guest's state for its customer, keyed by the
        customer; docs/identity.md)."""
        return f"{self.namespace}.identity"

    @property
    def collector_keys(self) -> frozenset[str]:
        """The accepted write keys (``CLICKPULSE_COLLECTOR_WRITE_KEYS``, blanks dropped)."""
        return frozenset(k.strip() for k in self.collector_write_keys.split(",") if k.strip())

    @property
    def user_retention_ms(self) -> int:
        return int(self.user_retention_s * 1000)

    @property
    def api_key_list(self) -> tuple[str, ...]:
        """The keys of ``CLICKPULSE_API_KEYS`` (stripped, empty entries dropped)."""
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    def env(self) -> dict[str, str]:
        """These settings as ``CLICKPULSE_*`` env vars (to start a worker subprocess)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[_env(f.name)] = str(getattr(self, f.name))
        return out


ENV_VARS = tuple(_env(f.name) for f in dataclasses.fields(Settings) if f.name != "extra")
