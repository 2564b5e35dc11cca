"""One record type per output topic: what clickpulse publishes, as typed dicts.

A leaf module (it imports nothing from clickpulse), so every stage can name the records it
builds without importing the stage that publishes them. The records are plain ``dict`` at run
time (``TypedDict``: no copy, no wrapper, orjson encodes them directly); their JSON Schemas in
``schemas/`` are the contract and ``tests/unit/test_settings_schemas.py`` /
``tests/integration`` check every published record against them.

==========================  ==================================  ================================
record                      topic                               schema
==========================  ==================================  ================================
:class:`ActionRecord`       ``<ns>.actions``                    ``schemas/action.v1.json``
:class:`SegmentChangeRecord` ``<ns>.segments``                  ``schemas/segment_change.v1.json``
:class:`ExampleRecord`      ``<ns>.training``                   ``schemas/example.v1.json``
:class:`DeadLetterRecord`   ``<ns>.events.dlq``                 ``schemas/dlq.v1.json``
:class:`QuarantineRecord`   ``<ns>.quarantine``                 ``schemas/quarantine.v1.json``
:class:`ControlRecord`      ``<ns>.events.raw`` (signed header) ``schemas/control.v1.json``
:class:`MergeRecord`        ``<ns>.identity``                   ``schemas/merge.v1.json``
:class:`ExperimentRecord`   ``<ns>.experiments``                ``schemas/experiment.v1.json``
:class:`SegmentSizesRecord` ``<ns>.segment-sizes`` (compacted) ``schemas/segment_sizes.v1.json``
==========================  ==================================  ================================
"""

from __future__ import annotations

from typing import Any, TypedDict


class ActionRecord(TypedDict, total=False):
    """An action for downstream services. ``action_id`` is deterministic (UUIDv5 of user, rule or
    model, occurrence), so re-processing the same input gives the same id; ``event_time_ms`` is
    the event time (epoch ms) that fired it; ``created_at`` (RFC 3339, wall clock) is the only
    non-deterministic field."""

    schema_version: int
    action_id: str
    type: str
    user_key: str
    user_id: str | None
    anonymous_id: str | None
    event_time: str
    event_time_ms: int
    reason: str
    payload: dict[str, Any]
    trigger: str
    model_version: str | None
    rules_version: str | None
    created_at: str
    #: set on the actions of a trigger with an experiment (docs/experiments.md): its name, the
    #: user's arm (a variant or ``holdout``) and whether to deliver it (``False`` for the holdout)
    experiment: str
    variant: str
    deliver: bool


class SegmentChangeRecord(TypedDict, total=False):
    """A user entered or left a segment; ``segment_size`` is the segment's members among the
    users of this user's partition after the change (the global size, over every partition, is
    on the worker's ``/segments`` and ``clickpulse_segment_members``)."""

    schema_version: int
    user_key: str
    segment: str
    change: str  # "entered" | "exited"
    event_time: str
    event_time_ms: int
    rules_version: str
    segment_size: int


class ExampleRecord(TypedDict, total=False):
    """A labeled training example (``task`` ``intent``/``churn``: features ``x``, label ``y``) or
    a session example for the trainer's tiers (``x``) and Markov chain (``path``)."""

    schema_version: int
    example_id: str
    task: str
    user_key: str
    x: dict[str, float]
    y: bool
    score: float
    model_version: str
    predicted_at_ms: int
    label_at_ms: int
    event_time_ms: int
    path: list[str]


class DeadLetterSource(TypedDict):
    """Where a dead-lettered message was read: topic, partition, offset, Kafka timestamp (ms)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


class DeadLetterRecord(TypedDict, total=False):
    """An input that was not processed: the reason (one of ``DLQ_REASONS``), a detail, where it
    came from, and the original key and value (base64, value cut at
    ``CLICKPULSE_DLQ_MAX_PAYLOAD_BYTES``; ``value_sha256`` identifies the full value)."""

    schema_version: int
    reason: str
    detail: str
    source: DeadLetterSource
    key_b64: str | None
    value_b64: str | None
    value_size: int
    value_truncated: bool
    value_sha256: str | None
    failed_at: str


class QuarantineRecord(TypedDict):
    """A user's stored state that could not be processed, moved aside (the user continues from a
    fresh state): ``stage`` ``event`` or ``timer``, the error, the old state (base64 of its
    table value, ``None`` when there was none)."""

    schema_version: int
    user_key: str
    stage: str
    error: str
    quarantined_at: str
    state_b64: str | None


class ExperimentRecord(TypedDict, total=False):
    """A fact of an experiment (:mod:`clickpulse.experiments.attribution`): a user's first
    ``exposure`` (``source_id`` = the action's id) or an attributed ``conversion`` inside the
    window (``source_id`` = the event's id, ``revenue`` its revenue). ``record_id`` is
    deterministic (UUIDv5), so a re-published record is recognised."""

    schema_version: int
    record_id: str
    kind: str  # "exposure" | "conversion"
    experiment: str
    variant: str
    user_key: str
    event_time: str
    event_time_ms: int
    exposure_time_ms: int
    revenue: float | None
    source_id: str
    rules_version: str | None
    share: float | None


class ControlRecord(TypedDict, total=False):
    """End of a bounded input, from the trusted control topic (never from the raw topic)."""

    schema_version: int
    control: str  # "end_of_input"
    source_partition: int
    source_partitions: int
    run_id: str


class MergeRecord(TypedDict):
    """A guest's state for the customer it was linked to (identity stitching, see
    :mod:`clickpulse.engine.identity`), keyed by ``customer_key``: the guest's serialized state
    as it was right after the link event (base64 of ``UserState.to_bytes()``), the link event
    (canonical, as applied to the guest) and its event time (epoch ms). Applied once per
    ``(guest_key, link event_id)``."""

    schema_version: int
    guest_key: str
    customer_key: str
    link_event: dict[str, Any]
    linked_at_ms: int
    state_b64: str
class SegmentSizesRecord(TypedDict):
    """The member counts of one partition's users per segment, as counted by the worker that
    owns the partition; on the compacted ``<ns>.segment-sizes``, keyed by the partition number
    (decimal ASCII), so the topic keeps the latest count of every partition. Every worker reads
    the whole topic and adds the other partitions' counts to its own (global ``min_size``).
    ``counts``: ``{segment: members}`` (segments without members left out); ``published_at_ms``:
    wall clock (epoch ms) of the publication; ``rules_version``: the rules the counts were taken
    under (``None``: no rules)."""

    schema_version: int
    partition: int
    counts: dict[str, int]
    published_at_ms: int
    rules_version: str | None
