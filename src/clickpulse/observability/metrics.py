"""Every Prometheus metric of clickpulse, declared once.

Label sets are fixed and low-cardinality (never user ids): ``type`` is a canonical event type
or ``custom``; ``reason`` is a dead-letter reason code. Latency histograms are in seconds with
buckets from 50 µs. Pass your own ``CollectorRegistry`` to keep tests isolated.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..events.contract import CANONICAL_TYPES

LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: end-to-end (producer publish -> worker) latencies, seconds: milliseconds on an idle worker up to
#: minutes behind a backlog
END_TO_END_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                        600.0)


def type_label(etype: str) -> str:
    """Bound the ``type`` label: canonical types as themselves, anything else as ``custom``."""
    return etype if etype in CANONICAL_TYPES else "custom"


class Metrics:
    """The metric families. Names follow Prometheus conventions (``_total`` counters, base units)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.raw_in = Counter("clickpulse_raw_messages_total", "Messages read from the raw topic", registry=r)
        self.events_valid = Counter("clickpulse_events_valid_total", "Events that passed validation, by type",
                                    ["type"], registry=r)
        self.events_invalid = Counter("clickpulse_events_invalid_total",
                                      "Messages sent to the dead-letter topic, by reason", ["reason"], registry=r)
        self.events_in = Counter("clickpulse_events_processed_total",
                                 "Events applied to user state (after de-duplication), by type", ["type"], registry=r)
        self.duplicates = Counter("clickpulse_events_duplicate_total", "Events dropped as duplicates (same event_id)",
                                  registry=r)
        self.redelivered = Counter("clickpulse_events_redelivered_total",
                                   "Input messages skipped after a restart because the saved state already holds "
                                   "them (re-read below the restored position, or forwarded again by the ingest)",
                                   ["topic"], registry=r)
        self.late = Counter("clickpulse_events_late_total",
                            "Events behind the watermark (not counted in windows; lifetime still updated)", registry=r)
        self.clock_corrected = Counter("clickpulse_events_clock_corrected_total",
                                       "Events whose future event time was clamped/corrected", registry=r)
        self.sessions = Counter("clickpulse_sessions_started_total", "Sessions started", registry=r)
        self.users_expired = Counter("clickpulse_users_expired_total",
                                     "Users removed from the state table after CLICKPULSE_USER_RETENTION_S of event "
                                     "time without events (and no pending timer)", registry=r)
        self.users_new = Counter("clickpulse_users_new_total", "Users seen for the first time by this app", registry=r)
        self.actions = Counter("clickpulse_actions_total", "Actions published, by type", ["type"], registry=r)
        self.timers_skipped_late = Counter("clickpulse_timers_skipped_late_total",
                                           "Timers not armed because the late event that would arm them "
                                           "was already past due", registry=r)
        self.examples = Counter("clickpulse_training_examples_total", "Labeled examples sent to the trainer, by task",
                                ["task"], registry=r)
        self.predictions_dropped = Counter("clickpulse_predictions_dropped_total",
                                           "Unlabeled predictions dropped from the buffer, by reason "
                                           "(per_user, capacity, expired)", ["reason"], registry=r)
        self.predictions_pending = Gauge("clickpulse_predictions_pending", "Unlabeled intent predictions buffered",
                                         registry=r)
        self.model_metric = Gauge("clickpulse_model_metric",
                                  "Progressive-validation metric of the newest model snapshot "
                                  "(roc_auc, pr_auc, log_loss, f1, precision, recall, accuracy)",
                                  ["task", "metric", "scope"], registry=r)
        self.snapshots_rejected = Counter(
            "clickpulse_model_snapshots_rejected_total",
            "Model snapshots not installed, by reason (unsigned, key_mismatch, bad_signature, malformed, "
            "unknown_task, stale, invalid_model, no_key); the current model keeps serving", ["reason"], registry=r)
        self.model_examples = Gauge("clickpulse_model_examples", "Examples learned by the model in use", ["task"],
                                    registry=r)
        self.timers_pending = Gauge("clickpulse_timers_pending", "Pending event-time timers on this worker", registry=r)
        self.watermark = Gauge("clickpulse_watermark_seconds", "Lowest watermark over assigned partitions (epoch s)",
                               registry=r)
        self.process_latency = Histogram("clickpulse_event_process_seconds",
                                         "Wall time to apply one event to state and fire timers",
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.redis_writes = Counter("clickpulse_redis_profiles_written_total", "Profiles written to Redis", registry=r)
        self.redis_errors = Counter("clickpulse_redis_errors_total", "Failed Redis flushes", registry=r)
        self.redis_dropped = Counter("clickpulse_redis_profiles_dropped_total",
                                     "Profiles dropped from the write-behind buffer (over CLICKPULSE_REDIS_MAX_PENDING)",
                                     registry=r)
        self.redis_pending = Gauge("clickpulse_redis_pending_profiles", "Profiles waiting to be written", registry=r)
        self.model_actions_suppressed = Counter(
            "clickpulse_model_actions_suppressed_total",
            "Model actions not published because the model had not yet learned "
            "CLICKPULSE_MODEL_MIN_CLASS_EXAMPLES examples of each class", ["type"], registry=r)
        self.rule_decisions = Counter("clickpulse_rule_decisions_total",
                                      "Trigger decisions by trigger and outcome (fired, bot, consent, cooldown, "
                                      "once_per, segment_too_small, late)", ["trigger", "outcome"], registry=r)
        self.rule_errors = Counter("clickpulse_rule_errors_total",
                                   "Rule expressions that failed at run time (counted as false), by rule",
                                   ["rule"], registry=r)
        self.segment_changes = Counter("clickpulse_segment_changes_total", "Segment entries and exits",
                                       ["change"], registry=r)
        self.segment_members = Gauge("clickpulse_segment_members",
                                     "Members per segment over all partitions (this worker's live counts + "
                                     "the others' published ones)", ["segment"], registry=r)
        self.segment_conversion = Gauge("clickpulse_segment_conversion_rate",
                                        "Share of segment membership stints with a purchase (raw and "
                                        "beta-binomial smoothed)", ["segment", "estimate"], registry=r)
        self.bots = Counter("clickpulse_bots_flagged_total", "Users flagged as bots (crawler UA, implausible rate)",
                            registry=r)
        self.rules_reloads = Counter("clickpulse_rules_reloads_total", "Rules file reloads by result",
                                     ["result"], registry=r)
        self.rules_info = Gauge("clickpulse_rules_version_info", "The active rules version (value 1)", ["version"],
                                registry=r)
        self.dlq_publish_errors = Counter("clickpulse_dlq_publish_errors_total",
                                          "Dead-letter records that could not be published", registry=r)
        self.engine_errors = Counter("clickpulse_engine_errors_total",
                                     "Events whose processing raised in the engine (rolled back alone, dead-lettered "
                                     "as internal)", registry=r)
        self.batch_size = Histogram("clickpulse_batch_events", "Events per engine step",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.control_forged = Counter("clickpulse_control_forged_total",
                                      "Raw messages claiming to be control (clickpulse-control header): "
                                      "dead-lettered as forged_control", registry=r)
        self.publish_errors = Counter("clickpulse_publish_errors_total",
                                      "Output records (actions, segment changes, examples, dead letters) the "
                                      "broker did not acknowledge", registry=r)
        self.users_quarantined = Counter("clickpulse_users_quarantined_total",
                                         "Users whose stored state could not be processed: moved to the quarantine "
                                         "topic, continuing from a fresh state", registry=r)
        self.input_stalls = Counter("clickpulse_input_stalls_total",
                                    "Input partitions of this worker with lag that made no progress (no commit, "
                                    "no new record) for CLICKPULSE_STALL_TIMEOUT_S; the worker then exits 75",
                                    ["topic"], registry=r)
        self.input_gaps = Counter("clickpulse_input_gaps_total",
                                  "Runs of input offsets the consumer never delivered to the worker (a jump in "
                                  "a partition's offsets; Faust may commit past them: those events are lost)",
                                  ["topic"], registry=r)
        self.commit_stalls = Counter("clickpulse_commit_stalls_total",
                                     "Checks (every 30 s) that found an input partition whose offset commits cannot "
                                     "advance (its oldest uncommitted message never acknowledged)", registry=r)
        self.users_repaired = Counter("clickpulse_users_repaired_total",
                                      "clickpulse quarantine repair requests carried out, by outcome (repaired: the "
                                      "state is back; failed: it still cannot be processed, nothing changed)",
                                      ["outcome"], registry=r)
        self.profile_errors = Counter("clickpulse_profile_errors_total",
                                      "Redis profiles that could not be built (skipped)", registry=r)
        self.users_deleted = Counter("clickpulse_users_deleted_total",
                                     "Dormant users deleted after CLICKPULSE_DORMANT_RETENTION_S", registry=r)
        self.users_erased = Counter("clickpulse_users_erased_total", "Erasure requests carried out", registry=r)
        # identity stitching (clickpulse.engine.identity)
        self.identity_links = Counter(
            "clickpulse_identity_links_total",
            "Identity link outcomes: linked (a guest became a stub, its state sent), merged (a customer took a "
            "guest's state), merge_duplicate, repeat (a link already made), conflict (a guest already linked to "
            "another customer: first link wins, no state moved), unsupported (an alias between two user ids)",
            ["outcome"], registry=r)
        self.identity_forwarded = Counter("clickpulse_identity_forwarded_total",
                                          "Events of a linked guest forwarded to its customer", registry=r)
        # experiments (clickpulse.experiments): labels are the rules file's experiment and arm names
        self.experiment_exposures = Counter("clickpulse_experiment_exposures_total",
                                            "Users exposed to an experiment (first decision), by experiment and "
                                            "arm (a variant or holdout)", ["experiment", "variant"], registry=r)
        self.experiment_conversions = Counter("clickpulse_experiment_conversions_total",
                                              "Conversions attributed to an experiment arm (event time, within the "
                                              "window after exposure)", ["experiment", "variant"], registry=r)
        self.experiment_converters = Counter("clickpulse_experiment_converters_total",
                                             "Exposed users with a first attributed conversion, by experiment and arm",
                                             ["experiment", "variant"], registry=r)
        self.experiment_revenue = Counter("clickpulse_experiment_revenue_total",
                                          "Revenue attributed to an experiment arm (purchase revenue, within the "
                                          "window after exposure)", ["experiment", "variant"], registry=r)
        self.pii_fields = Counter("clickpulse_pii_fields_total",
                                  "Event fields the PII policy changed at ingest, by action (dropped: a key "
                                  "not allowed; hashed: a value replaced by its keyed hash)", ["action"], registry=r)
        # -- operations (docs/operations.md) ------------------------------------------------------
        self.consumer_lag = Gauge("clickpulse_consumer_lag_messages",
                                  "Records on an input partition assigned to this worker that its consumer group "
                                  "has not committed yet (log-end offset - committed offset; polled every "
                                  "CLICKPULSE_HEALTH_POLL_S)", ["topic", "partition"], registry=r)
        self.dependency_up = Gauge("clickpulse_dependency_up",
                                   "1 when the last check of a dependency (kafka, redis) succeeded, else 0; "
                                   "/ready answers 503 while one is 0", ["dependency"], registry=r)
        self.dependency_checks = Counter("clickpulse_dependency_checks_total",
                                         "Dependency checks by dependency and result (ok, error)",
                                         ["dependency", "result"], registry=r)
        self.action_latency = Histogram("clickpulse_action_latency_seconds",
                                        "Produce -> action: the action's created_at (wall clock) minus the Kafka "
                                        "timestamp of the input record that triggered it (the producer's publish "
                                        "to the raw topic), by action type; actions fired by idle-time timers "
                                        "have no triggering record and are not observed", ["type"],
                                        buckets=END_TO_END_BUCKETS_S, registry=r)
        self.event_latency = Histogram("clickpulse_event_latency_seconds",
                                       "Produce -> processed, once per engine step: wall time at the step minus "
                                       "the Kafka timestamp of the step's oldest input record (its worst event)",
                                       buckets=END_TO_END_BUCKETS_S, registry=r)


class ExperimentGauges:
    """The experiments' analysis as gauges (``clickpulse report experiments --textfile``, in their
    own registry: the node_exporter textfile collector or a pushgateway serves them). Labels are
    the rules file's experiment and arm names and the statistic's name, never a user."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.experiment_stat = Gauge("clickpulse_experiment_stat",
                                     "An experiment arm's analysis: users, converters, conversion_rate, "
                                     "revenue_per_user, lift, lift_ci_low, lift_ci_high, p_value_z, p_value_welch, "
                                     "p_beats_baseline, expected_loss, p_value_always_valid",
                                     ["experiment", "variant", "statistic"], registry=r)
        self.experiment_srm_p = Gauge("clickpulse_experiment_srm_p_value",
                                      "Sample-ratio-mismatch chi-square p-value per experiment (a mismatch below "
                                      "0.001)", ["experiment"], registry=r)
