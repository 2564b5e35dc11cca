"""Every Kafka topic of clickpulse, and creating them with the right partition counts.

=====================================  =========  ============================================
topic                                  key        value
=====================================  =========  ============================================
``<ns>.events.raw``                    any        producer JSON (``schemas/event.v1.json``,
                                                  lenient) or control (header)
``<ns>.events.valid``                  user_key   canonical event / control (header)
``<ns>.events.dlq``                    raw key    ``schemas/dlq.v1.json``
``<ns>.actions``                       user_key   ``schemas/action.v1.json``
``<ns>.segments``                      user_key   ``schemas/segment_change.v1.json``
``<ns>.training`` (1 partition)        user_key   ``schemas/example.v1.json``
``<ns>.models`` (compacted)            task       ``schemas/snapshot.v1.json``
``<ns>.quarantine`` (compacted)        user_key   ``schemas/quarantine.v1.json``
``<ns>.privacy``                       user_key   ``schemas/privacy_request.v1.json``
``<ns>.privacy.audit``                 request id ``schemas/privacy_audit.v1.json``
``<ns>.segment-sizes`` (compacted, 1)  partition  ``schemas/segment_sizes.v1.json``
``<ns>-worker-users-changelog``        user_key   user state (Faust table changelog, compacted)
=====================================  =========  ============================================

Control messages carry the header ``clickpulse-control``, a ``schemas/control.v1.json`` value and,
on the raw topic, the signature header ``clickpulse-control-sig`` (:mod:`clickpulse.events.control`);
an unsigned one is dead-lettered as ``forged_control``.
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from .errors import ConfigError
from .settings import Settings

log = logging.getLogger(__name__)

from .events.control import CONTROL_HEADER, CONTROL_SIG_HEADER  # noqa: F401 - re-exported


def topic_specs(s: Settings) -> dict[str, dict]:
    """Name -> {partitions, config} for every topic the app owns (the table changelog is Faust's)."""
    retention_7d = str(7 * 86400 * 1000)
    return {
        s.topic_raw: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        s.topic_valid: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        s.topic_dlq: {"partitions": 1, "config": {"retention.ms": str(30 * 86400 * 1000)}},
        s.topic_actions: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        s.topic_segments: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        # one partition: a single trainer learns every example in order
        s.topic_training: {"partitions": 1, "config": {"retention.ms": retention_7d}},
        # stored user states that could not be processed (latest per user; 30 days)
        s.topic_quarantine: {"partitions": 1, "config": {"cleanup.policy": "compact,delete",
                                                         "retention.ms": str(30 * 86400 * 1000)}},
        # erasure requests, keyed by user_key: co-partitioned with the user's state
        s.topic_privacy: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        # what each erasure removed (user key hashed); kept a year
        s.topic_privacy_audit: {"partitions": 1, "config": {"retention.ms": str(365 * 86400 * 1000)}},
        s.topic_models: {"partitions": 1, "config": {"cleanup.policy": "compact", "max.message.bytes": str(16 * 1024 * 1024)}},
        # the latest segment member counts of every partition (read whole by every worker)
        s.topic_segment_sizes: {"partitions": 1, "config": {"cleanup.policy": "compact"}},
    }


async def ensure_topics(s: Settings) -> None:
    """Create missing topics (idempotent); check existing ones have the expected partitions.

    Raises
    ------
    ConfigError
        An existing topic's partition count differs from the settings.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        specs = topic_specs(s)
        present = [name for name in specs if name in existing]
        if present:
            for d in await admin.describe_topics(present):
                want = specs[d["topic"]]["partitions"]
                have = len(d["partitions"])
                if have != want:
                    raise ConfigError(
                        f"topic {d['topic']} has {have} partitions but CLICKPULSE_PARTITIONS/settings want {want}; "
                        "the state table is co-partitioned with the stream, so they must match "
                        "(use a new CLICKPULSE_NAMESPACE or set CLICKPULSE_PARTITIONS={have})")
        new = [NewTopic(name, spec["partitions"], 1, topic_configs=spec["config"])
               for name, spec in topic_specs(s).items() if name not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", [t.name for t in new])
    finally:
        await admin.close()
