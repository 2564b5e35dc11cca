"""Segments and triggers of a :class:`~clickpulse.rules.ruleset.Ruleset`, evaluated per user in event time.

Pure and broker-free, like :mod:`clickpulse.state.user`: :func:`on_event` runs after an event
was applied to the user's state, :func:`on_timers` when the partition's watermark passes one of
the user's timers (:func:`next_due`). Everything a decision depends on is in the user's state
(``UserState.rules``, kept in the table's changelog), so a restart or a rules reload neither loses
nor repeats a decision.

Semantics (stated once, applied the same way live and in a replay)
------------------------------------------------------------------
* **Segments.** Membership is re-evaluated after each of the user's events and when one of the
  user's timers fires (a segment whose condition depends only on time passing, e.g.
  ``lifetime.days_since_last_order > 30``, is re-evaluated at the user's next event or timer).
  An entry or exit is a :class:`SegmentChange` (published on ``<ns>.segments``). A segment with
  fewer than ``min_size`` members (counted by the engine over its partitions, the user who just
  entered included, the one who just left excluded) is *inactive*: it
  is missing from the ``segments`` name of the namespace and its ``segment_enter`` /
  ``segment_exit`` triggers do not fire (outcome ``segment_too_small``).
* **``on: <event type>``.** The condition is evaluated on each (not late) event of that type;
  the trigger fires when it holds and did not hold at the user's previous event of that type
  (not-met → met). A firing suppressed by a gate below still consumes the transition.
  Late events (behind the watermark) fire nothing.
* **``on: {segment_enter|segment_exit: S}``.** Fires on the transition itself (condition checked
  at that moment).
* **``on: {timeout: {after: A, no: B, within_s: T}}``.** An *episode* starts at the first A that
  follows the user's latest B and ends at the next B. Each A of the episode (re)arms a timer due
  ``T`` seconds after the latest A (event time); a B at or after the latest A cancels it and
  closes the episode (also when it arrives after the due time but before the watermark passed it:
  the user did answer, within the allowed lateness). An A older than the latest B is ignored.
  The user's own event that moves the partition's watermark past a pending due time first fires
  that timer (over the state before the event; the engine does this), so the outcome does not
  depend on whether another user's event moved the watermark a moment earlier. An A whose timer would already
  be behind the watermark does not arm it (counted ``timer_skipped_late``). When the watermark
  passes the due time the condition is evaluated over the state as of the due time (with every
  event up to the watermark applied) and the trigger fires.
* **Gates**, in this order, each an outcome counted per trigger: the user is a bot (``bot``, see
  :mod:`clickpulse.rules.bots`: no rule action ever fires for a bot, and a bot is in no segment); the consent purpose of
  ``requires_consent`` is not granted (``consent``: the user's latest ``consent`` event decides;
  with none, the purposes of ``assumed_consent`` count as granted, no other); ``cooldown_s`` of
  event time has not passed since the trigger last fired for the user (``cooldown``);
  ``once_per`` (``episode``: a timeout's episode, ``session``: the session the decision's event
  time falls in, ``lifetime``) already used (``once_per``).
* **Held marketing decisions.** A bot is only recognised by its rate once it has been fast for a
  while (the 21st add within 10 s), but an ``on: add_to_cart`` trigger could fire at its 3rd
  add. So a decision of a trigger with ``requires_consent`` that is not a timeout (an event or
  segment trigger) is *held* for the bot-detection window (the larger of the two rate windows,
  60 s of event time by default) and published when the watermark passes that (outcome
  ``fired``), unless in the meantime the user was flagged as a bot (``bot``), withdrew the
  consent (``consent``) or a reload removed the trigger (``removed``). Its action keeps the
  deciding event's time, id, payload and rules version. Timeouts are not held (their own delay covers it).
* **Action ids** are UUIDv5 of ``user_key | trigger | occurrence`` where the occurrence is the
  event id (event triggers), the due time (timeouts) or ``enter|exit`` and the event id or time
  (segment triggers): re-processing the same input gives the same id whatever the rules
  version. Each action records the ``rules_version`` that decided it and its ``trigger``.
* **Reloads.** Per-trigger state is keyed by trigger name: a trigger kept across a reload keeps
  its timers, cooldown and once_per history (no double firing); a removed trigger's state is
  dropped at the user's next evaluation; a new one starts fresh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..events.contract import to_rfc3339
from ..state.user import UserState, action_id
from .bots import BotConfig, is_bot
from .bots import observe as observe_bot
from .namespace import namespace
from .ruleset import EvalError, Ruleset, Trigger, cel_env, evaluate_condition, flatten, render_payload

@dataclass(frozen=True)
class SegmentChange:
    """A user entered or left a segment (``schemas/segment_change.v1.json``)."""

    user_key: str
    segment: str
    change: str  # "entered" | "exited"
    at_ms: int
    rules_version: str

    def to_record(self) -> dict[str, Any]:
        return {"schema_version": 1, "user_key": self.user_key, "segment": self.segment, "change": self.change,
                "event_time": to_rfc3339(self.at_ms), "event_time_ms": self.at_ms,
                "rules_version": self.rules_version}


@dataclass
class RuleContext:
    """What an evaluation needs besides the user's state.

    Attributes
    ----------
    ruleset
        The active rules.
    segment_active
        ``name -> bool``: the segment has at least ``min_size`` members (the engine's counts).
    extra
        Extra namespace values computed by the engine (``scores.engagement``, ``scores.p_purchase``,
        ``tier``, ``conversion.user``): passed to :func:`clickpulse.rules.namespace.namespace`.
    assumed_consent
        Consent purposes taken as granted for a user who never sent a ``consent`` event.
    bots
        Bot-detection thresholds.
    created_at
        Wall-clock publication time of the actions (RFC 3339), their only non-deterministic field.
    """

    ruleset: Ruleset
    segment_active: Callable[[str], bool] = lambda _name: True
    extra: Callable[[UserState, int], Mapping[str, Any]] | None = None
    #: ``(segment, +1 | -1)`` as soon as a user enters / leaves it, so that the size the gate
    #: sees includes the user who just entered
    count_member: Callable[[str, int], None] | None = None
    assumed_consent: frozenset[str] = frozenset()
    bots: BotConfig = field(default_factory=BotConfig)
    created_at: str = ""

    @property
    def hold_ms(self) -> int:
        """How long a marketing (``requires_consent``) event/segment decision is held (ms)."""
        return max(self.bots.cart_window_ms, self.bots.events_window_ms)


@dataclass
class Outcome:
    """What one evaluation decided."""

    actions: list[dict[str, Any]] = field(default_factory=list)
    changes: list[SegmentChange] = field(default_factory=list)
    decisions: list[tuple[str, str]] = field(default_factory=list)  # (trigger, outcome)
    errors: list[EvalError] = field(default_factory=list)
    timer_skipped_late: int = 0
    bot_flagged: str | None = None  # the reason, when this event made the user a bot


def _tstate(st: UserState, name: str) -> dict[str, Any]:
    return st.rules.setdefault("t", {}).setdefault(name, {})


def _session_id(st: UserState, at_ms: int) -> int | None:
    """The id of the session ``at_ms`` falls in (or the latest one that started before it)."""
    for s in (st.session, st.prev_session):
        if s is not None and s.start_ms <= at_ms:
            return s.sid
    return None if st.session is None else st.session.sid


def consent_granted(st: UserState, purpose: str, assumed: frozenset[str] = frozenset()) -> bool:
    """True when the user's latest consent decision for ``purpose`` grants it (or, with no
    decision at all for it, when ``purpose`` is in ``assumed``)."""
    d = st.consent.get(purpose)
    return purpose in assumed if d is None else bool(d[0])


def _gate(st: UserState, trig: Trigger, at_ms: int, ctx: RuleContext) -> str | None:
    if is_bot(st.rules.get("bot", {})):
        return "bot"
    if trig.requires_consent is not None and not consent_granted(st, trig.requires_consent, ctx.assumed_consent):
        return "consent"
    ts = _tstate(st, trig.name)
    if trig.cooldown_s > 0 and ts.get("lf") is not None and at_ms - ts["lf"] < trig.cooldown_s * 1000:
        return "cooldown"
    if trig.once_per == "lifetime" and ts.get("n"):
        return "once_per"
    if trig.once_per == "session" and ts.get("n") and ts.get("ls") == _session_id(st, at_ms):
        return "once_per"
    if trig.once_per == "episode" and ts.get("e") is not None and ts.get("fe") == ts.get("e"):
        return "once_per"
    return None


def _reason(trig: Trigger, detail: str) -> str:
    return f"trigger {trig.name}: {detail}" + (f" ({trig.description})" if trig.description else "")


def _fire(st: UserState, trig: Trigger, at_ms: int, occurrence: str, detail: str, act: Any, ctx: RuleContext,
          out: Outcome) -> None:
    """Gate, then build the action and record the firing."""
    blocked = _gate(st, trig, at_ms, ctx)
    if blocked is not None:
        out.decisions.append((trig.name, blocked))
        return
    ts = _tstate(st, trig.name)
    ts["lf"] = at_ms
    ts["ls"] = _session_id(st, at_ms)
    ts["n"] = int(ts.get("n", 0)) + 1
    if ts.get("e") is not None:
        ts["fe"] = ts["e"]
    payload = render_payload(trig.action.payload, act, out.errors)
    action = {
        "schema_version": 1,
        "action_id": action_id(st.key, trig.name, occurrence),
        "type": trig.action.type,
        "user_key": st.key,
        "user_id": st.user_id,
        "anonymous_id": st.anonymous_id,
        "event_time": to_rfc3339(at_ms),
        "event_time_ms": at_ms,
        "reason": _reason(trig, detail),
        "payload": payload if isinstance(payload, dict) else {"value": payload},
        "trigger": trig.name,
        "model_version": None,
        "rules_version": ctx.ruleset.version,
        "created_at": ctx.created_at,
    }
    if trig.requires_consent is not None and trig.on.kind != "timeout" and ctx.hold_ms > 0:
        st.rules.setdefault("held", []).append([at_ms + ctx.hold_ms, action])
        out.decisions.append((trig.name, "held"))
        return
    out.actions.append(action)
    out.decisions.append((trig.name, "fired"))


def _flat(st: UserState, at_ms: int, ctx: RuleContext, segments: list[str],
          event: Mapping[str, Any] | None) -> dict[str, Any]:
    extra = ctx.extra(st, at_ms) if ctx.extra is not None else None
    visible = [s for s in segments if ctx.segment_active(s)]
    return flatten(namespace(st, at_ms, segments=visible, event=event, extra=extra))


def _ns(st: UserState, at_ms: int, ctx: RuleContext, segments: list[str], event: Mapping[str, Any] | None) -> Any:
    return cel_env().Activation(_flat(st, at_ms, ctx, segments, event))


def _segments(st: UserState, at_ms: int, ctx: RuleContext, event: Mapping[str, Any] | None,
              out: Outcome) -> tuple[Any, list[str], list[str]]:
    """Re-evaluate membership; returns (activation with the new membership, entered, exited)."""
    before = list(st.rules.get("seg", []))
    flat = _flat(st, at_ms, ctx, before, event)
    act = cel_env().Activation(flat)
    now = [] if is_bot(st.rules.get("bot", {})) else ctx.ruleset.matching_segments(act, out.errors)
    entered = [s for s in now if s not in before]
    exited = [s for s in before if s not in now]
    if entered or exited:
        if now:
            st.rules["seg"] = now
        else:
            st.rules.pop("seg", None)
        for s in entered:
            out.changes.append(SegmentChange(st.key, s, "entered", at_ms, ctx.ruleset.version))
            if ctx.count_member is not None:
                ctx.count_member(s, +1)
        for s in exited:
            out.changes.append(SegmentChange(st.key, s, "exited", at_ms, ctx.ruleset.version))
            if ctx.count_member is not None:
                ctx.count_member(s, -1)
        flat["segments"] = [s for s in now if ctx.segment_active(s)]  # only membership changed
        act = cel_env().Activation(flat)
    return act, entered, exited


def _segment_triggers(st: UserState, at_ms: int, ctx: RuleContext, act: Any, entered: list[str],
                      exited: list[str], occurrence: str, out: Outcome) -> None:
    if not (entered or exited):
        return
    for trig in ctx.ruleset.triggers:
        kind = trig.on.kind
        if kind not in ("segment_enter", "segment_exit"):
            continue
        seg = trig.on.segment
        if seg not in (entered if kind == "segment_enter" else exited):
            continue
        if not ctx.segment_active(seg):  # the size counts the user who just entered / not the one who left
            out.decisions.append((trig.name, "segment_too_small"))
            continue
        if evaluate_condition(trig.when, act, out.errors):
            verb = "entered" if kind == "segment_enter" else "left"
            _fire(st, trig, at_ms, f"{kind}|{occurrence}", f"{verb} segment {seg}", act, ctx, out)


def _prune(st: UserState, rs: Ruleset) -> None:
    t = st.rules.get("t")
    if t:
        names = {trig.name for trig in rs.triggers}
        for name in [n for n in t if n not in names]:
            del t[name]
        if not t:
            del st.rules["t"]


def on_event(st: UserState, event: Mapping[str, Any], late: bool, watermark_ms: int | None,
             ctx: RuleContext) -> Outcome:
    """Evaluate the rules after ``event`` was applied to ``st`` (in place: updates ``st.rules``).

    Parameters
    ----------
    st
        The user's state, with the event already applied.
    event
        The canonical event (``type``, ``timestamp_ms``, ``event_id``, ``properties``, ``context``).
    late
        The event was behind the watermark (:class:`clickpulse.state.user.Applied`): it still
        updates bot detection and timeouts, fires nothing.
    watermark_ms
        The partition's watermark before the event (``None`` before any event).
    ctx
        The ruleset and the engine's view (segment sizes, extra namespace values).

    Returns
    -------
    Outcome
        Actions (``schemas/action.v1.json``), segment changes, per-trigger decisions, runtime
        evaluation errors (a failing condition is false, never an exception).
    """
    out = Outcome()
    rs = ctx.ruleset
    t = int(event["timestamp_ms"])
    etype = event["type"]
    _prune(st, rs)
    bot = st.rules.setdefault("bot", {})
    out.bot_flagged = observe_bot(bot, dict(event), ctx.bots)
    if not bot:
        del st.rules["bot"]
    # timeouts: arm on A, cancel on B (also for late events: they are facts about the episode)
    for trig in rs.triggers:
        to = trig.on.timeout
        if to is None:
            continue
        ts = _tstate(st, trig.name)
        if etype in to.no:
            ts["b"] = max(t, ts.get("b", t))
            if ts.get("a") is None or t >= ts["a"]:  # answers every A so far: the episode ends
                for k in ("due", "e", "a"):
                    ts.pop(k, None)
        elif etype == to.after:
            if ts.get("b") is not None and t <= ts["b"]:
                continue  # answered already
            if ts.get("e") is None:  # the episode's identity: its first A to arrive (never moves)
                ts["e"] = t
            ts["a"] = max(t, ts.get("a", t))
            due = ts["a"] + int(to.within_s * 1000)
            if trig.once_per == "episode" and ts.get("fe") == ts["e"]:
                ts.pop("due", None)  # this episode has had its action
            elif watermark_ms is not None and due < watermark_ms:
                out.timer_skipped_late += 1  # the window passed unobserved
            else:
                ts["due"] = due
        if not ts:
            del st.rules["t"][trig.name]
    if st.rules.get("t") == {}:
        del st.rules["t"]
    act, entered, exited = _segments(st, t, ctx, event, out)
    if late:
        for trig in rs.triggers_on(etype):
            out.decisions.append((trig.name, "late"))
        return out
    for trig in rs.triggers_on(etype):
        met = evaluate_condition(trig.when, act, out.errors)
        ts = _tstate(st, trig.name)
        was = bool(ts.get("m"))
        if met:
            ts["m"] = 1
        else:
            ts.pop("m", None)
        if met and not was:
            _fire(st, trig, t, str(event["event_id"]), f"{etype} at {to_rfc3339(t)} and {trig.when.source}", act,
                  ctx, out)
        if not ts:
            st.rules["t"].pop(trig.name, None)
    _segment_triggers(st, t, ctx, act, entered, exited, str(event["event_id"]), out)
    if st.rules.get("t") == {}:
        del st.rules["t"]
    return out


def next_due(st: UserState) -> int | None:
    """The earliest pending timeout of the user (event time, epoch ms), ``None`` when none."""
    dues = [ts["due"] for ts in st.rules.get("t", {}).values() if "due" in ts]
    dues += [h[0] for h in st.rules.get("held", [])]
    return min(dues) if dues else None


def on_timers(st: UserState, watermark_ms: int, ctx: RuleContext) -> Outcome:
    """Fire the user's timeouts that ``watermark_ms`` is strictly past, in due-time order, then
    re-evaluate segments as of the latest fired due time. Updates ``st.rules`` in place."""
    out = Outcome()
    rs = ctx.ruleset
    _prune(st, rs)
    held = st.rules.get("held", [])
    if held:
        keep = []
        current = {trig.name: trig for trig in rs.triggers}
        for due, action in held:
            name = action["trigger"]
            trig = current.get(name)
            if not watermark_ms > due:
                keep.append([due, action])
            elif trig is None:  # removed by a reload while held: a stopped campaign sends nothing
                out.decisions.append((name, "removed"))
            elif is_bot(st.rules.get("bot", {})):
                out.decisions.append((name, "bot"))
            elif trig.requires_consent is not None and \
                    not consent_granted(st, trig.requires_consent, ctx.assumed_consent):
                out.decisions.append((name, "consent"))  # withdrawn while held
            else:
                out.actions.append({**action, "created_at": ctx.created_at})
                out.decisions.append((name, "fired"))
        if keep:
            st.rules["held"] = keep
        else:
            del st.rules["held"]
    due_now = sorted((ts["due"], name) for name, ts in st.rules.get("t", {}).items()
                     if "due" in ts and watermark_ms > ts["due"])
    if not due_now:
        return out
    by_name = {trig.name: trig for trig in rs.triggers}
    last_at = due_now[-1][0]
    for due, name in due_now:
        trig = by_name[name]
        ts = _tstate(st, name)
        ts.pop("due", None)
        to = trig.on.timeout
        if to is None:  # no longer a timeout after a reload: its pending timer is dropped
            continue
        act = _ns(st, due, ctx, list(st.rules.get("seg", [])), None)
        if evaluate_condition(trig.when, act, out.errors):
            no = " or ".join(to.no)
            a = ts.get("a", due)
            _fire(st, trig, due, str(due),  # the delay the timer was armed with (rules may have changed)
                  f"no {no} within {(due - a) / 1000:g} s after {to.after} at {to_rfc3339(a)}", act, ctx, out)
    act, entered, exited = _segments(st, last_at, ctx, None, out)
    _segment_triggers(st, last_at, ctx, act, entered, exited, str(last_at), out)
    return out
