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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

TIME_MODES = ("live", "replay")


def _env(name: str) -> str:
    return "CLICKPULSE_" + name.upper()


#: the shortest secret key accepted (bytes)
MIN_KEY_BYTES = 16


def secret_bytes(value: str, env_name: str, min_bytes: int = MIN_KEY_BYTES) -> bytes:
    """The key bytes of a secret setting: an even number of at least ``2 * min_bytes`` hex digits
    is decoded, anything else is taken as UTF-8 text (surrounding whitespace dropped); empty
    gives ``b""``.

    Raises
    ------
    ConfigError
        A non-empty key shorter than ``min_bytes`` bytes.
    """
    value = value.strip()
    if not value:
        return b""
    key = value.encode()
    if len(value) >= 2 * min_bytes and len(value) % 2 == 0:
        try:
            key = bytes.fromhex(value)
        except ValueError:
            pass
    if len(key) < min_bytes:
        raise ConfigError(f"{env_name} must be at least {min_bytes} bytes (e.g. `openssl rand -hex 32`)")
    return key


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
        Default 4.
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
    health_poll_s : float
        ``CLICKPULSE_HEALTH_POLL_S``; seconds between the worker's checks of Kafka (which also
        poll its consumer lag) and Redis for ``/ready`` and ``clickpulse_dependency_up``;
        ``/ready`` fails when a check failed or none succeeded for 3 periods (at least 15 s).
        Default 5.
    """

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "clickpulse"
    partitions: int = 4
    time_mode: str = "live"
    allowed_lateness_s: float = 60.0
    idle_timeout_s: float = 5.0
    max_future_skew_s: float = 300.0
    session_gap_s: float = 1800.0
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
    dlq_max_payload_bytes: int = 65536
    dedup_ids_per_user: int = 32
    user_retention_s: float = 30 * 86400.0
    dormant_retention_s: float = 730 * 86400.0
    redis_flush_interval_s: float = 0.5
    redis_max_pending: int = 100_000
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
    health_poll_s: float = 5.0
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
                    "batch_within_s", "max_in_flight_batches", "max_money", "max_quantity", "health_poll_s")
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
        if self.state_cache_users < 0:
            raise ConfigError(f"{_env('state_cache_users')} must be >= 0, got {self.state_cache_users!r}")
        if self.snapshot_key and len(self.snapshot_key.strip()) < 16:
            raise ConfigError(f"{_env('snapshot_key')} must be at least 16 characters (e.g. `openssl rand -hex 32`), "
                              f"got {len(self.snapshot_key.strip())}")
        if not self.namespace or not all(c.isalnum() or c in "-_." for c in self.namespace):
            raise ConfigError(f"{_env('namespace')} must be non-empty [A-Za-z0-9._-], got {self.namespace!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``CLICKPULSE_*`` variables (``os.environ`` by default).

        Raises
        ------
        ConfigError
            A variable cannot be converted to its field's type, or a value is out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(_env(f.name))
            if raw is None:
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw) if kind is not bool else raw.lower() in ("1", "true", "yes")
            except ValueError as err:
                raise ConfigError(f"{_env(f.name)}={raw!r} is not a valid {kind.__name__}") from err
        # the local services scripts take CLICKPULSE_KAFKA_PORT / CLICKPULSE_REDIS_PORT; without an
        # explicit address, connect to where those scripts put the services
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
    def topic_privacy(self) -> str:
        return f"{self.namespace}.privacy"

    @property
    def topic_privacy_audit(self) -> str:
        return f"{self.namespace}.privacy.audit"

    @property
    def user_retention_ms(self) -> int:
        return int(self.user_retention_s * 1000)

    def env(self) -> dict[str, str]:
        """These settings as ``CLICKPULSE_*`` env vars (to start a worker subprocess)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[_env(f.name)] = str(getattr(self, f.name))
        return out


ENV_VARS = tuple(_env(f.name) for f in dataclasses.fields(Settings) if f.name != "extra")
