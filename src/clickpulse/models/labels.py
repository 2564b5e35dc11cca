"""Scoring points, delayed labels and model-driven actions, as pure functions on a user state.

**Purchase intent** (session level): P(this session ends with a purchase), 0–1.

* Scored after ``add_to_cart``, ``checkout_start`` and every ``score_every``-th event of a session
  that has no purchase yet. The features *as of that moment* are stored with the score in the
  user's state (``ml["pi"]``), so the example later learned is exactly what was predicted on —
  never a state that already contains the outcome (SCENARIOS S6).
* Label 1 as soon as a purchase arrives in the session; label 0 when the session ends without
  one (30 min of inactivity, event time: the watermark passes ``last event + gap``, or a later
  event starts a new session).
* The buffer is bounded per user (``pending_per_user``, oldest dropped), in total (the engine's
  ``pending_total``) and expires (``pending_max_age_ms`` of event time): dropped predictions are
  counted, never learned.

**Churn** (user level): P(the user does not return within ``churn_horizon_ms``), scored at
session end on the features at that time. Label 0 when any later event of the user arrives
before the horizon; 1 when the watermark passes ``session end + horizon`` (an event-time timer
stored in the state, so it survives restarts). The end of a bounded input (``--flush``) does not
resolve churn labels: a file ending says nothing about users coming back.

**Actions**: ``high_intent`` when intent ≥ ``intent_threshold`` while the cart is non-empty (once
per session); ``churn_risk`` when churn ≥ ``churn_threshold`` at session end, with a cooldown of
``churn_cooldown_ms`` (event time). Both carry the score, the model version and the top
contributing features.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..events.contract import to_rfc3339
from .features import features, pack, unpack
from ..state.clock import END_OF_TIME
from ..state.user import ACTION_NAMESPACE, Session, UserState, action_id, cart_items

DAY_MS = 86_400_000


@dataclass(frozen=True)
class ModelConfig:
    """Model settings in milliseconds (see :class:`clickpulse.settings.Settings`)."""

    session_gap_ms: int = 1_800_000
    score_every: int = 5
    intent_threshold: float = 0.8
    churn_threshold: float = 0.7
    churn_horizon_ms: int = 14 * DAY_MS
    churn_cooldown_ms: int = 7 * DAY_MS
    pending_per_user: int = 8
    pending_max_age_ms: int = 6 * 3_600_000

    @classmethod
    def from_settings(cls, s: Any) -> ModelConfig:
        return cls(s.session_gap_ms, s.intent_score_every, s.intent_threshold, s.churn_threshold,
                   int(s.churn_horizon_days * DAY_MS), int(s.churn_cooldown_days * DAY_MS),
                   s.pending_per_user, int(s.pending_max_age_s * 1000))


#: (task, features) -> (score in [0, 1], model version, () -> top features [[name, contribution], ...])
Scorer = Callable[[str, dict[str, float]], tuple[float, str, Callable[[], list[list[Any]]]]]


@dataclass
class Outcome:
    """What a step produced: actions to publish, labeled examples for the trainer, and counts of
    predictions dropped from the buffers (by reason)."""

    actions: list[dict[str, Any]]
    examples: list[dict[str, Any]]
    dropped: dict[str, int]
    buffered: int = 0  # net change of buffered intent predictions

    @classmethod
    def empty(cls) -> Outcome:
        return cls([], [], {})

    def extend(self, other: Outcome) -> None:
        self.actions += other.actions
        self.examples += other.examples
        for k, v in other.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v
        self.buffered += other.buffered


def example(st: UserState, task: str, pred: list[Any], y: bool, label_ms: int) -> dict[str, Any]:
    """A labeled example (``schemas/example.v1.json``) from a stored prediction."""
    at_ms, score, version, packed = pred
    x = unpack(packed) if isinstance(packed, list) else packed
    eid = uuid.uuid5(ACTION_NAMESPACE, f"{st.key}|{task}|{at_ms}|{sorted(x.items())}")
    return {"schema_version": 1, "example_id": str(eid),
            "task": task, "user_key": st.key, "x": x, "y": bool(y), "score": score, "model_version": version,
            "predicted_at_ms": at_ms, "label_at_ms": label_ms}


def _action(st: UserState, atype: str, at_ms: int, discriminator: str, reason: str, payload: dict[str, Any],
            version: str, created_at: str) -> dict[str, Any]:
    return {"schema_version": 1, "action_id": action_id(st.key, atype, discriminator), "type": atype,
            "user_key": st.key, "user_id": st.user_id, "anonymous_id": st.anonymous_id,
            "event_time": to_rfc3339(at_ms), "event_time_ms": at_ms, "reason": reason, "payload": payload,
            "model_version": version, "rules_version": None, "created_at": created_at}


def _resolve_intent(st: UserState, session_start: int, y: bool, label_ms: int) -> Outcome:
    out = Outcome.empty()
    keep = []
    for p in st.ml.get("pi", []):
        if p[0] == session_start:
            out.examples.append(example(st, "intent", p[1:], y, label_ms))
            out.buffered -= 1
        else:
            keep.append(p)
    _set(st, "pi", keep)
    return out


def _set(st: UserState, key: str, value: Any) -> None:
    if value:
        st.ml[key] = value
    else:
        st.ml.pop(key, None)


def expire(st: UserState, now_ms: int, cfg: ModelConfig) -> Outcome:
    """Drop intent predictions older than ``pending_max_age_ms`` (event time)."""
    out = Outcome.empty()
    pending = st.ml.get("pi", [])
    keep = [p for p in pending if now_ms - p[1] <= cfg.pending_max_age_ms]
    if len(keep) != len(pending):
        out.dropped["expired"] = len(pending) - len(keep)
        out.buffered -= len(pending) - len(keep)
        _set(st, "pi", keep)
    return out


def end_session(st: UserState, session: Session, score: Scorer, cfg: ModelConfig, created_at: str,
                returning: bool = False) -> Outcome:
    """The session is over (``last + gap`` passed): label its intent predictions, score churn.

    ``returning``: the end is processed because the user's next session already began; the churn
    prediction is still made and learned (label 0), but no ``churn_risk`` action is sent for a
    user who is back."""
    session.ended = True
    end_ms = session.last_ms + cfg.session_gap_ms
    purchased = session.counts.get("purchase", 0) > 0
    out = _resolve_intent(st, session.sid, purchased, end_ms)
    if session is not st.session:
        return out  # an older session closing late: no churn prediction for it
    x = features(st, session.last_ms)
    p, version, top = score("churn", x)
    st.ml.setdefault("sc", {}).update({"churn": p, "churn_version": version})
    st.ml["pc"] = [session.last_ms, session.last_ms + cfg.churn_horizon_ms, p, version, pack(x)]
    last = st.ml.get("cr")
    if not returning and p >= cfg.churn_threshold and (last is None or session.last_ms - last >= cfg.churn_cooldown_ms):
        st.ml["cr"] = session.last_ms
        out.actions.append(_action(
            st, "churn_risk", end_ms, str(session.last_ms),
            f"churn risk {p:.2f} ≥ {cfg.churn_threshold:.2f} at the end of a session "
            f"({session.events} events, {session.duration_ms / 60000:.0f} min)",
            {"score": p, "threshold": cfg.churn_threshold, "top_features": top(),
             "horizon_days": cfg.churn_horizon_ms / DAY_MS}, version, created_at))
    return out


def before_event(st: UserState, t: int, score: Scorer, cfg: ModelConfig, created_at: str) -> Outcome:
    """Run before applying an event at ``t``: a user returning resolves churn (0, or 1 past the
    horizon); an event a full gap after the current session ends that session first, on the
    state as it was (no leakage of the new session into churn features)."""
    out = Outcome.empty()
    s = st.session
    if s is not None and not s.ended and t >= s.last_ms + cfg.session_gap_ms:
        out.extend(end_session(st, s, score, cfg, created_at, returning=True))
    out.extend(expire(st, t, cfg))  # after labelling: a session's own predictions are never expired first
    pc = st.ml.get("pc")
    if pc is not None and t >= pc[0] + cfg.session_gap_ms:  # a new session: the user is back
        out.examples.append(example(st, "churn", [pc[0], pc[2], pc[3], pc[4]], t >= pc[1], min(t, pc[1])))
        del st.ml["pc"]
    return out


def after_event(st: UserState, event: dict[str, Any], score: Scorer, cfg: ModelConfig, created_at: str,
                late: bool, allow_buffer: bool = True) -> Outcome:
    """Score intent at the defined points; a purchase labels the session's predictions 1."""
    out = Outcome.empty()
    s = st.session
    t = int(event["timestamp_ms"])
    if s is None or s.ended or late or not (s.start_ms <= t <= s.last_ms):
        return out
    etype = event["type"]
    if etype == "purchase":
        return _resolve_intent(st, s.sid, True, t)
    if s.counts.get("purchase", 0) > 0:
        return out  # the outcome is known: no more intent predictions in this session
    if not (etype in ("add_to_cart", "checkout_start") or s.events % cfg.score_every == 0):
        return out
    x = features(st, t)
    p, version, top = score("intent", x)
    st.ml.setdefault("sc", {}).update({"intent": p, "intent_version": version})
    pending = st.ml.setdefault("pi", [])
    if allow_buffer:
        pending.append([s.sid, t, p, version, pack(x)])
        out.buffered += 1
    else:
        out.dropped["capacity"] = 1
    _set(st, "pi", pending)
    if len(pending) > cfg.pending_per_user:
        drop = len(pending) - cfg.pending_per_user
        del pending[:drop]
        out.dropped["per_user"] = drop
        out.buffered -= drop
    if p >= cfg.intent_threshold and st.cart.items and st.ml.get("hi") != s.sid:
        st.ml["hi"] = s.sid
        out.actions.append(_action(
            st, "high_intent", t, str(s.sid),
            f"purchase intent {p:.2f} ≥ {cfg.intent_threshold:.2f} with {len(st.cart.items)} product(s) "
            f"in the cart: a moment for live chat or assistance",
            {"score": p, "threshold": cfg.intent_threshold, "top_features": top(),
             "cart": {"items": cart_items(st.cart), "value": st.cart.value, "currency": st.cart.currency}},
            version, created_at))
    return out


def on_watermark(st: UserState, wm: int, score: Scorer, cfg: ModelConfig, created_at: str) -> Outcome:
    """Timers of the model side: session end (intent labels, churn score), churn horizon."""
    out = Outcome.empty()
    s = st.session
    if s is not None and not s.ended and wm > s.last_ms + cfg.session_gap_ms:
        out.extend(end_session(st, s, score, cfg, created_at))
    if wm != END_OF_TIME:
        out.extend(expire(st, wm, cfg))  # after labelling, as in before_event
    pc = st.ml.get("pc")
    if pc is not None and wm != END_OF_TIME and wm > pc[1]:
        out.examples.append(example(st, "churn", [pc[0], pc[2], pc[3], pc[4]], True, pc[1]))
        del st.ml["pc"]
    return out


def next_due(st: UserState, cfg: ModelConfig, closed: bool = False) -> int | None:
    """The earliest model-side timer of the user (event time), ``None`` when there is none."""
    dues = []
    s = st.session
    if s is not None and not s.ended:
        dues.append(s.last_ms + cfg.session_gap_ms)
    pc = st.ml.get("pc")
    if pc is not None and not closed:
        dues.append(pc[1])
    return min(dues) if dues else None
