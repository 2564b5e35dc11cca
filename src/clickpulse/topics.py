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
``<ns>.experiments``                   user_key   ``schemas/experiment.v1.json``
``<ns>.training`` (1 partition)        user_key   ``schemas/example.v1.json``
``<ns>.models`` (compacted)            task       ``schemas/snapshot.v1.json``
``<ns>.quarantine`` (compacted)        user_key   ``schemas/quarantine.v1.json``
``<ns>.privacy``                       user_key   ``schemas/privacy_request.v1.json``
``<ns>.privacy.audit``                 request id ``schemas/privacy_audit.v1.json``
``<ns>.identity``                      user_key   ``schemas/merge.v1.json`` (a guest's state for its
                                                  customer, keyed by the customer; docs/identity.md)
``<ns>.segment-sizes`` (compacted, 1)  partition  ``schemas/segment_sizes.v1.json``
``<ns>-worker-users-changelog``        user_key   user state (Faust table changelog, compacted)
=====================================  =========  ============================================

Control messages carry the header ``clickpulse-control``, a ``schemas/control.v1.json`` value and,
on the raw topic, the signature header ``clickpulse-control-sig`` (:mod:`clickpulse.events.control`);
an unsigned one is dead-lettered as ``forged_control``.

Partitions (``CLICKPULSE_PARTITIONS``) and the replication factor (``CLICKPULSE_REPLICATION_FACTOR``)
are settings; the topics marked 1 partition above keep one whatever the setting. Consumer groups of a
namespace: ``<ns>-worker`` (Faust app id), ``<ns>-trainer``, ``<ns>-delivery``.
:func:`namespace_of` recognises every topic above (and Faust's ``<ns>-worker-__assignor-__leader``),
so ``clickpulse topics list|clean`` can find what a namespace left on a cluster.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Bytes, Int16, Int32, Schema, String

from .errors import ConfigError, ServiceError, error_text
from .settings import Settings

log = logging.getLogger(__name__)

from .events.control import CONTROL_HEADER, CONTROL_SIG_HEADER  # noqa: F401,E402 - re-exported

#: consumer groups of a namespace: ``<ns>`` + one of these
GROUP_SUFFIXES = ("-worker", "-trainer", "-delivery")
TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


def topic_specs(s: Settings) -> dict[str, dict]:
    """Name -> {partitions, replication, config} for every topic the app owns (the table
    changelog is Faust's, created with the same replication factor)."""
    retention_7d = str(7 * 86400 * 1000)
    specs = {
        s.topic_raw: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        s.topic_valid: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        s.topic_dlq: {"partitions": 1, "config": {"retention.ms": str(30 * 86400 * 1000)}},
        s.topic_actions: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        s.topic_segments: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        # experiment exposures and conversions (docs/experiments.md): kept 90 days for the analysis
        s.topic_experiments: {"partitions": s.partitions, "config": {"retention.ms": str(90 * 86400 * 1000)}},
        # one partition: a single trainer learns every example in order
        s.topic_training: {"partitions": 1, "config": {"retention.ms": retention_7d}},
        # stored user states that could not be processed (latest per user; 30 days)
        s.topic_quarantine: {"partitions": 1, "config": {"cleanup.policy": "compact,delete",
                                                         "retention.ms": str(30 * 86400 * 1000)}},
        # erasure requests, keyed by user_key: co-partitioned with the user's state
        s.topic_privacy: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        # what each erasure removed (user key hashed); kept a year
        s.topic_privacy_audit: {"partitions": 1, "config": {"retention.ms": str(365 * 86400 * 1000)}},
        # identity stitching: merge records keyed by the customer, co-partitioned with the state
        s.topic_identity: {"partitions": s.partitions, "config": {"retention.ms": retention_7d}},
        s.topic_models: {"partitions": 1, "config": {"cleanup.policy": "compact", "max.message.bytes": str(16 * 1024 * 1024)}},
        # the latest segment member counts of every partition (read whole by every worker)
        s.topic_segment_sizes: {"partitions": 1, "config": {"cleanup.policy": "compact"}},
    }
    for spec in specs.values():
        spec["replication"] = s.replication_factor
    return specs


def _dotted_suffixes() -> tuple[str, ...]:
    """``.events.raw``, ``.actions`` ... : every ``<ns>.<suffix>`` topic name a namespace uses
    (the ``topic_*`` properties of :class:`Settings`, and delivery's ``<ns>.actions.dlq``),
    longest first."""
    probe = Settings(namespace="ns")
    names = {getattr(probe, a) for a in dir(Settings) if a.startswith("topic_")
             and isinstance(getattr(Settings, a), property)}
    names.add(f"{probe.topic_actions}.dlq")
    return tuple(sorted((n[len("ns"):] for n in names if n.startswith("ns.")), key=len, reverse=True))


_FAUST_TOPIC = re.compile(r"^(?P<ns>.+)-worker-(?:__assignor-__leader|[A-Za-z0-9_]+-changelog)$")


def namespace_of(topic: str) -> str | None:
    """The namespace a clickpulse topic belongs to, ``None`` for any other topic.

    >>> namespace_of("demo-20261201.events.raw"), namespace_of("a.b-worker-users-changelog")
    ('demo-20261201', 'a.b')
    >>> namespace_of("__consumer_offsets") is None
    True
    """
    for suffix in _dotted_suffixes():
        if topic.endswith(suffix) and len(topic) > len(suffix):
            return topic[:-len(suffix)]
    m = _FAUST_TOPIC.match(topic)
    return m.group("ns") if m else None


def group_namespace(group: str) -> str | None:
    """The namespace a consumer group belongs to (``<ns>-worker`` ...), else ``None``."""
    for suffix in GROUP_SUFFIXES:
        if group.endswith(suffix) and len(group) > len(suffix):
            return group[:-len(suffix)]
    return None


@contextlib.asynccontextmanager
async def kafka_admin(s: Settings, request_timeout_ms: int = 30000) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client for ``s.kafka_bootstrap``, closed on exit.

    Raises
    ------
    ServiceError
        No broker answers at ``CLICKPULSE_KAFKA_BOOTSTRAP``.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=request_timeout_ms)
    try:
        await admin.start()
    except KafkaConnectionError as err:
        await admin.close()
        raise kafka_unreachable(s.kafka_bootstrap, err) from err
    try:
        yield admin
    finally:
        await admin.close()


def kafka_unreachable(bootstrap: str, err: BaseException) -> ServiceError:
    """The error for a broker that does not answer (one wording for every command)."""
    return ServiceError(f"Kafka is not reachable at {bootstrap} (CLICKPULSE_KAFKA_BOOTSTRAP): {err}; "
                        "is the broker running? (locally: deploy/local/services.sh start)")


async def ensure_topics(s: Settings) -> None:
    """Create missing topics (idempotent); check existing ones have the expected partitions.

    Raises
    ------
    ConfigError
        An existing topic's partition count differs from the settings, or the broker refused to
        create a topic (e.g. a replication factor above the number of brokers).
    ServiceError
        Kafka is not reachable.
    """
    async with kafka_admin(s) as admin:
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
                        f"(use a new CLICKPULSE_NAMESPACE or set CLICKPULSE_PARTITIONS={have})")
                rf = len(d["partitions"][0]["replicas"]) if d["partitions"] else s.replication_factor
                if rf != s.replication_factor:
                    log.warning("topic %s has replication factor %d, CLICKPULSE_REPLICATION_FACTOR is %d "
                                "(existing topics keep theirs)", d["topic"], rf, s.replication_factor)
        new = [NewTopic(name, spec["partitions"], spec["replication"], topic_configs=spec["config"])
               for name, spec in specs.items() if name not in existing]
        if new:
            resp = await admin.create_topics(new)
            errors = {e[0]: (e[1], e[2] if len(e) > 2 else None) for e in resp.topic_errors
                      if e[1] not in (0, TOPIC_EXISTS)}
            if errors:
                name, (code, msg) = next(iter(sorted(errors.items())))
                raise ConfigError(f"Kafka refused to create topic {name} (and {len(errors) - 1} more) with "
                                  f"{specs[name]['partitions']} partitions, replication factor "
                                  f"{s.replication_factor} (CLICKPULSE_REPLICATION_FACTOR): "
                                  f"{for_code(code).__name__}: {msg or ''}".rstrip(": "))
            log.info("created topics %s", [t.name for t in new])


# ---- clickpulse topics list | clean --------------------------------------------------------


class _DeleteGroupsResponse_v0(Response):
    API_KEY = 42
    API_VERSION = 0
    SCHEMA = Schema(("throttle_time_ms", Int32),
                    ("results", Array(("group_id", String("utf-8")), ("error_code", Int16))))


class _DeleteGroupsResponse_v1(Response):
    API_KEY = 42
    API_VERSION = 1
    SCHEMA = _DeleteGroupsResponse_v0.SCHEMA


class _DeleteGroupsRequest_v0(RequestStruct):
    API_KEY = 42
    API_VERSION = 0
    RESPONSE_TYPE = _DeleteGroupsResponse_v0
    SCHEMA = Schema(("groups_names", Array(String("utf-8"))))


class _DeleteGroupsRequest_v1(RequestStruct):
    API_KEY = 42
    API_VERSION = 1
    RESPONSE_TYPE = _DeleteGroupsResponse_v1
    SCHEMA = _DeleteGroupsRequest_v0.SCHEMA


class _DeleteGroupsRequest(Request[_DeleteGroupsRequest_v0 | _DeleteGroupsRequest_v1]):
    """Kafka's DeleteGroups (API key 42, KIP-229; aiokafka 0.14's admin client has no call for it)."""

    API_KEY = 42

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class):  # type: ignore[no-untyped-def]
        return request_struct_class(self._groups)


class _DescribeGroupsResponse_v1(Response):
    API_KEY = 15
    API_VERSION = 1
    SCHEMA = Schema(("throttle_time_ms", Int32),
                    ("groups", Array(("error_code", Int16), ("group_id", String("utf-8")), ("state", String("utf-8")),
                                     ("protocol_type", String("utf-8")), ("protocol", String("utf-8")),
                                     ("members", Array(("member_id", String("utf-8")), ("client_id", String("utf-8")),
                                                       ("client_host", String("utf-8")), ("member_metadata", Bytes),
                                                       ("member_assignment", Bytes))))))


class _DescribeGroupsRequest_v1(RequestStruct):
    API_KEY = 15
    API_VERSION = 1
    RESPONSE_TYPE = _DescribeGroupsResponse_v1
    SCHEMA = Schema(("groups", Array(String("utf-8"))))


class _DescribeGroupsRequest(Request[_DescribeGroupsRequest_v1]):
    """Kafka's DescribeGroups v1 (API key 15): aiokafka 0.14's ``describe_consumer_groups`` fails to
    decode Kafka 4.0's answer (the connection is closed)."""

    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class):  # type: ignore[no-untyped-def]
        return request_struct_class(self._groups)


async def groups_with_members(s: Settings, groups: list[str]) -> dict[str, int]:
    """Group -> number of members, for the ``groups`` that have members now (a running worker,
    trainer or delivery process). Only consumers that joined a group are seen: a collector or a
    profile API (producers and readers without a group) cannot be detected.

    Raises
    ------
    ServiceError
        A group's membership could not be read (the clean must not go ahead blind).
    """
    out: dict[str, int] = {}
    async with kafka_admin(s) as admin:
        for g in groups:
            try:
                node = await admin.find_coordinator(g)
                resp = await admin._send_request(_DescribeGroupsRequest([g]), node)  # noqa: SLF001
            except KafkaError as err:
                raise ServiceError(f"cannot read the members of consumer group {g}: {error_text(err)}; "
                                   "nothing was deleted") from err
            for code, gid, _state, _ptype, _proto, members in resp.groups:
                if code == GROUP_NOT_FOUND:
                    continue
                if code != 0:
                    raise ServiceError(f"cannot read the members of consumer group {gid}: "
                                       f"{for_code(code).__name__}; nothing was deleted")
                if members:
                    out[gid] = len(members)
    return out


@dataclass
class NamespaceFootprint:
    """What one namespace left on Kafka (and Redis): topic -> partitions, groups, key count."""

    namespace: str
    topics: dict[str, int] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    redis_keys: int | None = None


async def footprints(s: Settings, pattern: str, *, describe: bool = True) -> dict[str, NamespaceFootprint]:
    """Every clickpulse namespace on the cluster whose name matches the glob ``pattern``
    (:func:`fnmatch.fnmatchcase`), with its topics (partition counts when ``describe``) and
    consumer groups."""
    out: dict[str, NamespaceFootprint] = {}
    async with kafka_admin(s) as admin:
        for t in await admin.list_topics():
            ns = namespace_of(t)
            if ns is not None and fnmatch.fnmatchcase(ns, pattern):
                out.setdefault(ns, NamespaceFootprint(ns)).topics[t] = 0
        for g, _proto in await admin.list_consumer_groups():
            ns = group_namespace(g)
            if ns is not None and fnmatch.fnmatchcase(ns, pattern):
                out.setdefault(ns, NamespaceFootprint(ns)).groups.append(g)
        if describe:
            names = [t for fp in out.values() for t in fp.topics]
            for i in range(0, len(names), 200):
                for d in await admin.describe_topics(names[i:i + 200]):
                    ns = namespace_of(d["topic"])
                    if ns in out and d["error_code"] == 0:
                        out[ns].topics[d["topic"]] = len(d["partitions"])
    for fp in out.values():
        fp.groups.sort()
    return dict(sorted(out.items()))


GROUP_NOT_FOUND, NON_EMPTY_GROUP = 69, 68  # Kafka error codes


async def delete_namespace(s: Settings, fp: NamespaceFootprint) -> list[str]:
    """Delete a namespace's consumer groups, then its topics; returns the problems (empty: all
    gone).

    Every group's membership is read first (:func:`groups_with_members`): if one has members (a
    worker, trainer or delivery process of the namespace is running and would recreate the
    topics), nothing is deleted. The groups then go before the topics; Kafka itself refuses to
    delete a group that got members since (``NON_EMPTY_GROUP``), and then no topic is deleted
    either. A collector or a profile API of the namespace has no consumer group and cannot be
    detected: stop them before cleaning.
    """
    problems: list[str] = []
    running: list[str] = sorted(await groups_with_members(s, fp.groups))
    if running:  # check every group before deleting any
        return [f"group {g} has members (its processes are running): stop them first; "
                "no topic of the namespace was deleted" for g in running]
    async with kafka_admin(s) as admin:
        for g in fp.groups:
            try:
                node = await admin.find_coordinator(g)
                resp = await admin._send_request(_DeleteGroupsRequest([g]), node)  # noqa: SLF001
            except KafkaError as err:
                problems.append(f"group {g}: {error_text(err)}")
                continue
            for gid, code in resp.results:
                if code == NON_EMPTY_GROUP:
                    running.append(gid)
                elif code not in (0, GROUP_NOT_FOUND):
                    problems.append(f"group {gid}: {for_code(code).__name__}")
        if running:
            return problems + [f"group {g} has members (its processes are running): stop them first; "
                               "no topic of the namespace was deleted" for g in running]
        names = sorted(fp.topics)
        for i in range(0, len(names), 100):
            resp = await admin.delete_topics(names[i:i + 100])
            for e in resp.topic_error_codes:
                if e[1] != 0:
                    problems.append(f"topic {e[0]}: {for_code(e[1]).__name__}")
    return problems
