"""The rules file: segments and triggers with CEL conditions, compiled once, hot-reloadable.

A rules file is YAML::

    version: "2026-11-01"              # a string (quote it): decisions carry "<version>+<hash>"
    segments:
      - name: cart_builders
        when: 'count.add_to_cart["7d"] > 2 && lifetime.orders == 0'
        min_size: 50                   # members before the segment may drive actions (default 50)
    triggers:
      - name: cart_abandonment
        on: {timeout: {after: add_to_cart, no: purchase, within_s: 1800}}
        when: '!cart.empty'            # default "true"
        action:
          type: cart_reminder
          payload:                     # a string is a CEL expression; other scalars are constants
            items: cart.items
            value: cart.value
            offer: '"FREESHIP"'        # a constant string is a CEL string literal
        cooldown_s: 86400              # default 0
        once_per: episode              # episode | session | day (local) | lifetime (default: none)
        requires_consent: marketing    # default: none
        experiment:                    # optional (docs/experiments.md)
          name: cart_offer_test        # unique in the file; the actions' "experiment"
          salt: "2026-12"              # default: the name
          holdout: 0.1                 # share decided but not delivered (deliver: false)
          window_s: 604800             # attribution window after exposure (event time)
          conversion: purchase         # event type(s) counted as a conversion
          allocation: fixed            # fixed (the weights) | thompson (bandit over the variants)
          variants:
            - {name: control, weight: 1}
            - {name: freeship, weight: 1, offer: '"FREESHIP"', delay_s: 3600}

``on`` is an event type (``product_view``), ``{segment_enter: NAME}``, ``{segment_exit: NAME}``
or ``{timeout: {after: A, no: B, within_s: T}}`` ("after an A, no B within T seconds"; ``no``
may be a list of types). The names an expression can use are those of
:mod:`clickpulse.rules.namespace`.

Every expression is compiled and **type-checked** at load by the CEL reference runtime (cel-cpp,
through ``cel-expr-python``); nothing is ever passed to Python's ``eval``. A syntax error, an
unknown name (``cartt.value``), a type error (``cart.value > "x"``, ``cart.value > 50`` —
CEL does not mix ``double`` and ``int``: write ``50.0``) or a malformed rule raises
:class:`RulesError`, naming the rule, the field, the position and the reason. At run time an
expression can still fail (a trait or an event type the user does not have, a division by zero):
:func:`evaluate_condition` then answers False and reports the reason instead of raising.

:class:`RulesFile` keeps the active :class:`Ruleset` of a file and reloads it on
:meth:`RulesFile.poll` when its content changes; a bad reload keeps the previous ruleset and
records the error.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..yamlstrict import StrictLoader, YamlMap
from cel_expr_python import cel

from ..errors import ClickpulseError
from ..events.contract import CANONICAL_TYPES
from ..experiments.assignment import HOLDOUT, Experiment, Variant
from ..state.windows import SPANS
from .namespace import ALL, NONE, VARIABLES, Deps

log = logging.getLogger(__name__)

ONCE_PER = ("episode", "session", "day", "lifetime")
DEFAULT_MIN_SIZE = 50
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_CEL_ERROR_RE = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")
_COUNT_TYPE_RE = re.compile(r"\bcount\s*\.\s*([A-Za-z_]\w*)")
#: Consent purposes a rules file usually names (others load with a warning: a typo blocks a trigger).
COMMON_PURPOSES = ("marketing", "analytics", "personalization", "advertising", "functional", "email", "sms",
                   "push")
_WINDOW_KEY_RE = re.compile(r"\bcount\s*(?:\.\s*[A-Za-z_]\w*|\[\s*(?:\"[^\"]*\"|'[^']*')\s*\])\s*\[\s*[\"']([^\"']*)[\"']\s*\]")


class RulesError(ClickpulseError):
    """A rules file (or one expression) is invalid.

    The message names the file, the rule, the field, the position and the reason, e.g.
    ``rules.yaml: trigger 'cart_abandonment', field 'when' (file line 14), expression line 1,
    column 31: Syntax error: mismatched input '<EOF>' expecting ...``.

    Attributes
    ----------
    reason : str
        What is wrong.
    path : str | None
        The rules file.
    rule : str | None
        The rule's name (``None`` for a file-level problem).
    kind : str | None
        ``segment`` or ``trigger``.
    field : str | None
        The field, e.g. ``when``, ``on.timeout.within_s``, ``action.payload.items``.
    file_line : int | None
        1-based line of the file where the field (or the rule) is.
    line, column : int | None
        1-based position inside the CEL expression (from the CEL parser/type checker), or of a
        YAML syntax error in the file.
    """

    def __init__(self, reason: str, *, path: str | None = None, rule: str | None = None, kind: str | None = None,
                 field: str | None = None, file_line: int | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        self.reason = reason
        self.path = path
        self.rule = rule
        self.kind = kind
        self.field = field
        self.file_line = file_line
        self.line = line
        self.column = column
        where = []
        if rule is not None:
            where.append(f"{kind or 'rule'} {rule!r}")
        if field is not None:
            where.append(f"field {field!r}" + (f" (file line {file_line})" if file_line else ""))
        elif file_line:
            where.append(f"file line {file_line}")
        if line is not None:
            where.append(f"{'expression line' if field is not None else 'line'} {line}, column {column}")
        head = ", ".join(where)
        super().__init__((f"{path}: " if path else "") + (f"{head}: {reason}" if head else reason))


# --------------------------------------------------------------------------- CEL


_ENV: Any = None
_ENV_LOCK = threading.Lock()


def cel_env() -> Any:
    """The one CEL environment: the namespace's names declared with their types."""
    global _ENV
    if _ENV is None:
        with _ENV_LOCK:
            if _ENV is None:
                _ENV = cel.NewEnv(variables={name: cel.Type(sig) for name, sig in VARIABLES.items()})
    return _ENV


@dataclass(frozen=True, eq=False)
class Expr:
    """A compiled, type-checked CEL expression and where it came from.

    ``deps`` are the namespace names it reads (:func:`expression_deps`); :data:`ALL` when they
    could not be derived. ``guards``: see :func:`expression_guards`."""

    source: str
    rule: str
    field: str
    result_type: str  # CEL type name from the checker, e.g. BOOL, DOUBLE, DYN
    program: Any = field(repr=False)
    deps: Deps = field(default=ALL, repr=False)
    #: ``event`` key paths whose absence makes it false (:func:`expression_guards`)
    guards: frozenset[tuple[str, ...]] = field(default=frozenset(), repr=False)


@dataclass(frozen=True)
class EvalError:
    """A runtime failure of one expression (the condition counted as False)."""

    rule: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule}.{self.field}: {self.reason}"


def _cel_failure(message: str) -> tuple[int | None, int | None, str]:
    """(line, column, reason) of a cel-cpp compile error text."""
    found = _CEL_ERROR_RE.findall(message)
    if not found:
        return None, None, message.strip()
    reasons = [r.strip() for _l, _c, r in found]
    reason = "; ".join(dict.fromkeys(reasons))
    if re.search(r"applied to '\((double, int|int, double)", reason):
        reason += " (CEL does not mix int and double: write 50.0 rather than 50, or convert with double()/int())"
    first_line = message[message.index("ERROR: <input>"):].splitlines()
    snippet = [ln[3:] if ln.startswith(" | ") else ln for ln in first_line[1:3] if ln.startswith(" |")]
    if snippet:
        reason += "\n  " + "\n  ".join(s.replace(" [INVALID_ARGUMENT]", "") for s in snippet)
    return int(found[0][0]), int(found[0][1]), reason


def compile_expression(source: str, *, rule: str = "<expression>", field: str = "when", want_bool: bool = False,
                       kind: str | None = None, path: str | None = None, file_line: int | None = None) -> Expr:
    """Compile and type-check one CEL expression over the namespace.

    Raises
    ------
    RulesError
        Syntax error, unknown name or function, type error, or (``want_bool``) a result that
        cannot be a bool; with the position inside the expression.

    Examples
    --------
    >>> compile_expression('count.add_to_cart["7d"] > 2', want_bool=True).result_type
    'BOOL'
    >>> compile_expression('cart.value > 50', rule="r1")
    Traceback (most recent call last):
    ...
    clickpulse.rules.ruleset.RulesError: rule 'r1', field 'when', expression line 1, column 12: found no matching overload for '_>_' applied to '(double, int)' (CEL does not mix int and double: write 50.0 rather than 50, or convert with double()/int())
      cart.value > 50
      ...........^
    """
    ctx = {"rule": rule, "kind": kind, "field": field, "path": path, "file_line": file_line}
    if not isinstance(source, str) or not source.strip():
        raise RulesError("empty expression", **ctx)
    try:
        program = cel_env().compile(source)
    except Exception as err:  # cel-cpp reports every compile problem as RuntimeError(INVALID_ARGUMENT ...)
        line, column, reason = _cel_failure(str(err))
        raise RulesError(reason, line=line, column=column, **ctx) from err
    for m in _WINDOW_KEY_RE.finditer(source):  # a type-correct key CEL cannot know is absent
        if m.group(1) not in SPANS:
            before = source[: m.start(1) - 1]
            raise RulesError(f"unknown window {m.group(1)!r} (the windows are {', '.join(repr(x) for x in SPANS)})",
                             line=before.count("\n") + 1, column=len(before) - before.rfind("\n"), **ctx)
    result_type = program.return_type().name()
    if want_bool and result_type not in ("BOOL", "DYN"):
        raise RulesError(f"a condition must be a bool, this expression is a {result_type.lower()}", **ctx)
    return Expr(source, rule, field, result_type, program, expression_deps(program), expression_guards(program))


# ------------------------------------------------------------- what an expression reads
#
# ``Expression.serialize()`` of cel-expr-python is a google.protobuf.Any holding the type-checked
# AST (cel.expr.CheckedExpr, https://github.com/google/cel-spec/blob/master/proto/cel/expr/checked.proto).
# Its reference_map gives, for each identifier node, the declaration the checker resolved it to
# (``session.idle_s`` is one identifier there), so the names an expression reads are exactly the
# VARIABLES among the references: a string literal, a field name or a comprehension variable is
# never one. The AST tells which ``count`` types and spans are constant keys. Only the few
# fields needed are decoded (protobuf wire format); anything unexpected means "reads everything".

_CHECKED_EXPR_TYPES = ("type.googleapis.com/cel.expr.CheckedExpr",
                       "type.googleapis.com/google.api.expr.v1alpha1.CheckedExpr")


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if c < 0x80:
            return result, i
        shift += 7


def _fields(b: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of one protobuf message: an int (varint) or bytes."""
    out: list[tuple[int, Any]] = []
    i, n = 0, len(b)
    while i < n:
        tag, i = _varint(b, i)
        wire = tag & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 2:
            size, i = _varint(b, i)
            v, i = b[i:i + size], i + size
            if i > n:
                raise ValueError("truncated message")
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            v, i = b[i:i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((tag >> 3, v))
    if i != n:
        raise ValueError("truncated message")
    return out


class _Node:
    """One node of a checked CEL AST (only what dependency analysis needs)."""

    __slots__ = ("id", "kind", "name", "const", "has_target", "test_only", "children")

    def __init__(self) -> None:
        self.id = 0
        self.kind = ""           # ident | select | call | const | list | struct | comprehension
        self.name = ""           # ident name, select field, call function
        self.const: Any = None   # a string constant's value
        self.has_target = False  # a call with a receiver (children[0])
        self.test_only = False  # a select that is has(...)
        self.children: list[_Node] = []  # select: [operand]; call: [target] + args


def _node(b: bytes, bound: set[str]) -> _Node:
    node = _Node()
    for f, v in _fields(b):
        if f == 2 and isinstance(v, int):
            node.id = v
        elif f == 3:
            node.kind = "const"
            node.const = next((x.decode() for g, x in _fields(v) if g == 6), None)
        elif f == 4:
            node.kind = "ident"
            node.name = next((x.decode() for g, x in _fields(v) if g == 1), "")
        elif f == 5:
            node.kind = "select"
            for g, x in _fields(v):
                if g == 1:
                    node.children.append(_node(x, bound))
                elif g == 2:
                    node.name = x.decode()
                elif g == 3:
                    node.test_only = bool(x)
        elif f == 6:
            node.kind = "call"
            target = None
            args = []
            for g, x in _fields(v):
                if g == 1:
                    target = _node(x, bound)
                elif g == 2:
                    node.name = x.decode()
                elif g == 3:
                    args.append(_node(x, bound))
            node.children = ([target] if target is not None else []) + args
            node.has_target = target is not None
        elif f == 7:
            node.kind = "list"
            node.children = [_node(x, bound) for g, x in _fields(v) if g == 1]
        elif f == 8:
            node.kind = "struct"
            for g, entry in _fields(v):
                if g == 2:
                    node.children += [_node(x, bound) for h, x in _fields(entry) if h in (3, 4)]
        elif f == 9:
            node.kind = "comprehension"
            for g, x in _fields(v):
                if g in (1, 3, 8):
                    bound.add(x.decode())
                elif g in (2, 4, 5, 6, 7):
                    node.children.append(_node(x, bound))
    if not node.kind:
        raise ValueError("unknown expression kind")
    return node


def _constant_key(parent: _Node, child: _Node) -> str | None:
    """The constant map key ``parent`` selects from ``child`` (``child.key`` or ``child["key"]``)."""
    if parent.kind == "select" and parent.children[0] is child:
        return parent.name
    if parent.kind == "call" and parent.name == "_[_]" and not parent.has_target and len(parent.children) == 2 \
            and parent.children[0] is child and parent.children[1].kind == "const" \
            and isinstance(parent.children[1].const, str):
        return parent.children[1].const
    return None


#: map names whose reads at single keys are tracked (:attr:`Deps.map_reads`)
_KEYED = frozenset(n for n, sig in VARIABLES.items() if sig.startswith("map<string, ") and n not in ("count", "event"))


def _event_chain(node: _Node, refs: dict[int, str]) -> tuple[str, ...] | None:
    """The key path of ``node`` when it is ``event`` followed by constant keys (``event.a["b"]``)."""
    keys: list[str] = []
    cur = node
    while True:
        if cur.kind == "select" and not cur.test_only:
            keys.append(cur.name)
            cur = cur.children[0]
        elif cur.kind == "call" and cur.name == "_[_]" and not cur.has_target and len(cur.children) == 2 \
                and cur.children[1].kind == "const" and isinstance(cur.children[1].const, str):
            keys.append(cur.children[1].const)
            cur = cur.children[0]
        elif cur.kind == "ident" and refs.get(cur.id) == "event":
            return tuple(reversed(keys))
        else:
            return None


def _map_read(node: _Node, parent: _Node | None, refs: dict[int, str]) -> tuple[str, Any] | None:
    """How the map ``node`` is read by ``parent``: ``("k", key)`` at a constant key, ``("e", path)``
    at the key an event path gives, None otherwise (the whole map)."""
    if parent is None:
        return None
    key_node = None
    if parent.kind == "select" and parent.children[0] is node:
        return "k", parent.name
    if parent.kind == "call" and not parent.has_target and len(parent.children) == 2:
        if parent.name == "_[_]" and parent.children[0] is node:
            key_node = parent.children[1]
        elif parent.name == "@in" and parent.children[1] is node:
            key_node = parent.children[0]
    if key_node is None:
        return None
    if key_node.kind == "const" and isinstance(key_node.const, str):
        return "k", key_node.const
    path = _event_chain(key_node, refs)
    return None if path is None else ("e", path)


def _checked_ast(program: Any) -> tuple[dict[int, str], _Node, set[str]] | None:
    """(references by expression id, root node, comprehension variables), None when unreadable."""
    try:
        outer = dict(_fields(program.serialize()))
        if outer.get(1, b"").decode() not in _CHECKED_EXPR_TYPES:
            return None
        refs: dict[int, str] = {}
        root = None
        bound: set[str] = set()
        for f, v in _fields(outer[2]):
            if f == 2:  # reference_map entry: key (expr id), value (Reference: name = 1)
                entry = dict(_fields(v))
                ref = dict(_fields(entry.get(2, b"")))
                if isinstance(entry.get(1), int) and 1 in ref:
                    refs[entry[1]] = ref[1].decode()
            elif f == 4:
                root = _node(v, bound)
    except Exception:  # noqa: BLE001 - an unexpected encoding
        return None
    return None if root is None else (refs, root, bound)


def expression_guards(program: Any) -> frozenset[tuple[str, ...]]:
    """Key paths ``P`` of ``event`` such that the expression is ``has(event.P) && ...`` (a
    conjunct of its top-level ``&&`` chain): when the map holding ``P``'s last key lacks it, the
    expression is false (CEL's ``false && x`` is false whatever ``x``, errors included).

    >>> sorted(expression_guards(cel_env().compile('has(event.properties.category) && 1 / 0 == 1')))
    [('properties', 'category')]
    """
    ast = _checked_ast(program)
    if ast is None:
        return frozenset()
    refs, root, _bound = ast
    out: set[tuple[str, ...]] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node.kind == "call" and node.name == "_&&_" and not node.has_target and len(node.children) == 2:
            stack.extend(node.children)
        elif node.kind == "select" and node.test_only:
            chain = _event_chain(node.children[0], refs)
            if chain is not None:
                out.add((*chain, node.name))
    return frozenset(out)


def expression_deps(program: Any) -> Deps:
    """The namespace names a compiled expression reads (:class:`Deps`), from its checked AST.

    For ``count``, the event types and spans when every use is a constant key
    (``count.add_to_cart["7d"]``, ``count["purchase"]["24h"]``), else all of them; for ``event``,
    the paths of constant keys it is read through (``event.properties.category``: the path
    ``("properties", "category")``), else all of it; for the other maps (``category_views``,
    ``traits``...), the single keys they are read at when that is their only use
    (``traits.age_band``, ``"x" in consent``, ``category_views[event.properties.category]``).
    Conservative: :data:`ALL` when the AST cannot be read.

    >>> d = expression_deps(cel_env().compile('count.add_to_cart["7d"] > 2 && cart.value > 1.0 && "tier" != ""'))
    >>> sorted(d.names), sorted(d.count_types), sorted(d.count_spans)
    (['cart.value', 'count'], ['add_to_cart'], ['7d'])
    >>> sorted(expression_deps(cel_env().compile('has(event.properties.category)')).event_paths)
    [('properties', 'category')]
    >>> sorted(expression_deps(cel_env().compile('category_views[event.properties.category] > 1')).map_reads)
    [('category_views', 'e', ('properties', 'category'))]
    """
    ast = _checked_ast(program)
    if ast is None:
        return ALL
    refs, root, bound = ast
    names: set[str] = set()
    types: set[str] | None = set()
    spans: set[str] | None = set()
    paths: set[tuple[str, ...]] | None = set()
    reads: dict[str, set[tuple[str, Any]] | None] = {}  # keyed maps: how each is read
    parents: dict[int, _Node] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        for c in node.children:
            parents[id(c)] = node
        stack.extend(node.children)
        if node.kind != "ident":
            continue
        name = refs.get(node.id)
        if name is None:
            if node.name in bound:
                continue  # a comprehension's variable
            return ALL  # an identifier the checker did not resolve: be conservative
        if name not in VARIABLES:
            continue
        names.add(name)
        if name in _KEYED:
            read = _map_read(node, parents.get(id(node)), refs)
            have = reads.setdefault(name, set())
            if read is None or have is None:
                reads[name] = None
            else:
                have.add(read)
            continue
        if name not in ("count", "event"):
            continue
        keys: list[str] = []  # the constant keys the use goes through: count.<type>[<span>], event.a.b
        cur = node
        while (par := parents.get(id(cur))) is not None and (key := _constant_key(par, cur)) is not None:
            keys.append(key)
            cur = par
        if name == "event":
            if not keys:
                paths = None
            elif paths is not None:
                paths.add(tuple(keys))
            continue
        if not keys:
            types = spans = None
            continue
        if types is not None:
            types.add(keys[0])
        if len(keys) < 2:
            spans = None
        elif spans is not None:
            spans.add(keys[1])
    keyed = {n: r for n, r in reads.items() if r is not None}
    return Deps.of(names, types, spans, paths, keyed) if names else NONE


def activation(ns: Mapping[str, Any]) -> Any:
    """A CEL activation of a namespace (:func:`clickpulse.rules.namespace.namespace`); build it
    once per event and evaluate every expression against it."""
    return cel_env().Activation(flatten(ns))


_MISSING = object()
_PATHS: list[tuple[str, str, str]] = [(name, *name.partition(".")[::2]) for name in VARIABLES]


def flatten(ns: Mapping[str, Any]) -> dict[str, Any]:
    """The namespace as ``{CEL variable name: value}`` (``session.duration_s`` is one variable)."""
    flat: dict[str, Any] = {}
    for name, head, tail in _PATHS:
        value = ns.get(head, _MISSING)
        if value is _MISSING:
            continue
        if tail:
            if type(value) is not dict:
                continue
            value = value.get(tail, _MISSING)
            if value is _MISSING:
                continue
        flat[name] = value
    return flat


def _to_activation(act: Any) -> Any:
    return act if isinstance(act, cel.Activation) else activation(act)


def _json(v: Any) -> Any:
    """A CEL result as JSON-friendly Python (str keys, RFC 3339 timestamps, seconds, base64).
    Map keys are sorted: the CEL runtime's maps iterate in an order that differs between
    processes, and an action re-published by a restarted worker must be byte-identical to its
    first copy (docs/delivery.md)."""
    if isinstance(v, Mapping):
        return dict(sorted((str(_json(k)), _json(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return [_json(x) for x in v]
    if v is None or isinstance(v, str | bool | int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dt.datetime):
        return v.isoformat().replace("+00:00", "Z")
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, bytes | bytearray):
        return base64.b64encode(bytes(v)).decode()
    return str(v)


def evaluate(expr: Expr, act: Any) -> tuple[Any, str | None]:
    """Evaluate ``expr``; returns ``(value, None)`` (value as plain Python) or ``(None, reason)``.
    Never raises for a runtime error. ``act``: an :func:`activation` or a namespace dict."""
    try:
        value = expr.program.eval(_to_activation(act))
        if value.type().name() == "ERROR":
            return None, str(value.value())
        return _json(value.plain_value()), None
    except Exception as err:  # noqa: BLE001 - a rule must never take the stream down
        return None, f"{type(err).__name__}: {err}"


def evaluate_condition(expr: Expr, act: Any, errors: list[EvalError] | None = None) -> bool:
    """True when the condition holds. A runtime error (missing key, division by zero, a non-bool
    result) is False, never an exception; its reason is appended to ``errors`` when given.

    Examples
    --------
    >>> from clickpulse.rules.namespace import namespace
    >>> from clickpulse.state.user import UserState
    >>> ns = namespace(UserState("u1"), 0)
    >>> errs = []
    >>> evaluate_condition(compile_expression("traits.age_band == '25-34'", rule="r"), ns, errs)
    False
    >>> str(errs[0])
    'r.when: NOT_FOUND: Key not found in map : "age_band"'
    """
    value, reason = evaluate(expr, act)
    if reason is None and not isinstance(value, bool):
        reason = f"the condition gave {value!r}, not a bool"
    if reason is not None:
        if errors is not None:
            errors.append(EvalError(expr.rule, expr.field, reason))
        return False
    return bool(value)


# A payload template: nested dicts/lists whose leaves are Expr (strings in the file) or constants.
Template = Any


def render_payload(template: Template, act: Any, errors: list[EvalError] | None = None) -> Any:
    """Evaluate a payload template: every :class:`Expr` leaf is replaced by its value (``None``
    when it fails at run time, with the reason appended to ``errors``)."""
    if isinstance(template, Expr):
        value, reason = evaluate(template, act)
        if reason is not None and errors is not None:
            errors.append(EvalError(template.rule, template.field, reason))
        return value
    if isinstance(template, dict):
        return {k: render_payload(v, act, errors) for k, v in template.items()}
    if isinstance(template, list):
        return [render_payload(v, act, errors) for v in template]
    return template


# --------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Segment:
    name: str
    when: Expr
    min_size: int = DEFAULT_MIN_SIZE
    description: str = ""


@dataclass(frozen=True)
class Timeout:
    """"After an ``after`` event, no ``no`` event within ``within_s`` seconds" (event time)."""

    after: str
    no: tuple[str, ...]
    within_s: float


@dataclass(frozen=True)
class On:
    """What a trigger listens to: ``kind`` is ``event``, ``segment_enter``, ``segment_exit`` or
    ``timeout``."""

    kind: str
    event_type: str | None = None
    segment: str | None = None
    timeout: Timeout | None = None


@dataclass(frozen=True)
class Action:
    type: str
    payload: Template = field(default_factory=dict)


@dataclass(frozen=True)
class Trigger:
    name: str
    on: On
    when: Expr
    action: Action
    cooldown_s: float = 0.0
    once_per: str | None = None
    requires_consent: str | None = None
    description: str = ""
    #: an experiment on this trigger's decisions (:mod:`clickpulse.experiments`), or None
    experiment: Experiment | None = None

    @cached_property
    def payload_deps(self) -> Deps:
        """The namespace names its action's payload reads (built only when it fires; every
        variant's payload included)."""
        out = NONE
        for template in self.templates:
            for expr in _template_exprs(template):
                out = out | expr.deps
        return out

    @property
    def templates(self) -> list[Template]:
        """The payload templates: the trigger's and those of its experiment's variants."""
        out = [self.action.payload]
        if self.experiment is not None:
            out += [v.payload for v in self.experiment.variants if v.payload is not None]
        return out


def _template_exprs(template: Template) -> list[Expr]:
    """The :class:`Expr` leaves of a payload template."""
    out = []
    stack = [template]
    while stack:
        v = stack.pop()
        if isinstance(v, Expr):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


@dataclass(frozen=True)
class Ruleset:
    """One loaded rules file. ``version`` = the file's ``version`` + ``+`` + the first 8 hex
    digits of its SHA-256: what a decision records as its ``rules_version``."""

    version: str
    file_version: str
    content_hash: str  # full SHA-256 hex of the file's bytes
    segments: tuple[Segment, ...]
    triggers: tuple[Trigger, ...]
    path: str | None = None
    #: things that load but are probably mistakes (an event type no source sends by default)
    warnings: tuple[str, ...] = ()

    def segment(self, name: str) -> Segment:
        """The segment called ``name`` (KeyError if none)."""
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(name)

    @cached_property
    def experiments(self) -> dict[str, Experiment]:
        """Experiment name -> the experiment (declared on the triggers)."""
        return {t.experiment.name: t.experiment for t in self.triggers if t.experiment is not None}

    def trigger(self, name: str) -> Trigger:
        """The trigger called ``name`` (KeyError if none)."""
        for t in self.triggers:
            if t.name == name:
                return t
        raise KeyError(name)

    def triggers_on(self, event_type: str) -> list[Trigger]:
        """Triggers listening to ``event_type`` events (``on: <type>``)."""
        return list(self.event_triggers.get(event_type, ()))

    @cached_property
    def event_triggers(self) -> dict[str, tuple[Trigger, ...]]:
        """Event type -> the triggers listening to it (``on: <type>``), in file order."""
        out: dict[str, list[Trigger]] = {}
        for t in self.triggers:
            if t.on.kind == "event" and t.on.event_type is not None:
                out.setdefault(t.on.event_type, []).append(t)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def trigger_names(self) -> frozenset[str]:
        """The triggers' names."""
        return frozenset(t.name for t in self.triggers)

    @cached_property
    def segment_deps(self) -> Deps:
        """What the segments' conditions read."""
        out = NONE
        for s in self.segments:
            out = out | s.when.deps
        return out

    @cached_property
    def eval_deps(self) -> Deps:
        """What the segments' and the triggers' conditions read: the names an evaluation may build
        (:class:`clickpulse.rules.namespace.Deps`)."""
        out = self.segment_deps
        for t in self.triggers:
            out = out | t.when.deps
        return out

    @cached_property
    def payload_deps(self) -> Deps:
        """What the triggers' payloads read: built only when an action fires."""
        out = NONE
        for t in self.triggers:
            out = out | t.payload_deps
        return out

    @cached_property
    def runtime(self) -> dict[str, Any]:
        """Scratch space of the evaluator (:mod:`clickpulse.rules.triggers`: the incremental
        evaluation's cache); not part of the rules, dropped with the ruleset on a reload."""
        return {}

    def matching_segments(self, act: Any, errors: list[EvalError] | None = None) -> list[str]:
        """Names of the segments whose condition holds (``min_size`` is not applied here)."""
        act = _to_activation(act)
        return [s.name for s in self.segments if evaluate_condition(s.when, act, errors)]


# the strict loader (YAML 1.2 booleans: ``on:``/``no:`` stay keys; duplicate keys rejected; lines kept)
_Map = YamlMap
_Loader = StrictLoader


class _Ctx:
    """Error context while validating one rule."""

    def __init__(self, path: str | None, kind: str | None = None, rule: str | None = None,
                 node: Any = None) -> None:
        self.path, self.kind, self.rule, self.node = path, kind, rule, node

    def line_of(self, key: str | None, node: Any = None) -> int | None:
        node = self.node if node is None else node
        if key is not None and isinstance(node, _Map) and key in node.key_lines:
            return node.key_lines[key]
        return getattr(node, "line", None)

    def error(self, reason: str, field: str | None = None, node: Any = None, key: str | None = None) -> RulesError:
        if key is None and field:
            key = field.split(".")[-1]
        return RulesError(reason, path=self.path, rule=self.rule, kind=self.kind, field=field,
                          file_line=self.line_of(key, node))

    def expr(self, source: Any, field: str, *, want_bool: bool, node: Any = None, key: str | None = None) -> Expr:
        if isinstance(source, bool):
            source = "true" if source else "false"
        if not isinstance(source, str):
            raise self.error(f"expected a CEL expression (a string), got {type(source).__name__}", field, node, key)
        return compile_expression(source, rule=self.rule or "<file>", field=field, want_bool=want_bool,
                                  kind=self.kind, path=self.path,
                                  file_line=self.line_of(key if key is not None else field.split(".")[-1], node))


def _check_keys(ctx: _Ctx, m: Mapping[str, Any], allowed: set[str], required: set[str], where: str | None) -> None:
    for k in m:
        if k not in allowed:
            raise ctx.error(f"unknown field {k!r} (expected one of {', '.join(sorted(allowed))})",
                            f"{where}.{k}" if where else str(k), m, str(k))
    for k in sorted(required - set(m)):
        raise ctx.error(f"missing field {k!r}", f"{where}.{k}" if where else k, m, None)


def _name(ctx: _Ctx, m: Mapping[str, Any]) -> str:
    name = m.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ctx.error(f"a name must be a string of letters, digits, '_', '.', '-' starting with a letter "
                        f"(at most 64), got {name!r}", "name", m, "name")
    return name


def _number(ctx: _Ctx, m: Mapping[str, Any], key: str, field: str, *, default: float | None = None,
            positive: bool = False, integer: bool = False) -> float:
    v = m.get(key, default)
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if positive else v >= 0)
    if ok and integer and not isinstance(v, int):
        ok = False
    if not ok:
        what = ("a positive" if positive else "a non-negative") + (" integer" if integer else " number")
        raise ctx.error(f"expected {what}, got {v!r}", field, m, key)
    return v  # type: ignore[return-value]


def _type_name(ctx: _Ctx, v: Any, field: str, node: Any, key: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ctx.error(f"expected an event type (a string), got {v!r}", field, node, key)
    return v.strip()


def _template(ctx: _Ctx, v: Any, field: str, node: Any, key: str) -> Template:
    if isinstance(v, dict):
        return {str(k): _template(ctx, x, f"{field}.{k}", v, str(k)) for k, x in v.items()}
    if isinstance(v, list):
        return [_template(ctx, x, f"{field}[{i}]", node, key) for i, x in enumerate(v)]
    if isinstance(v, str):
        return ctx.expr(v, field, want_bool=False, node=node, key=key)
    if v is None or isinstance(v, bool | int | float):
        return v
    raise ctx.error(f"unsupported payload value {v!r}", field, node, key)


def _segment(path: str | None, m: Any, index: int) -> Segment:
    ctx = _Ctx(path, "segment", f"#{index + 1}", m)
    if not isinstance(m, dict):
        raise ctx.error("a segment must be a mapping with name and when")
    ctx.rule = _name(ctx, m)
    _check_keys(ctx, m, {"name", "when", "min_size", "description"}, {"name", "when"}, None)
    min_size = _number(ctx, m, "min_size", "min_size", default=DEFAULT_MIN_SIZE, integer=True)
    return Segment(ctx.rule, ctx.expr(m["when"], "when", want_bool=True), int(min_size), str(m.get("description", "")))


def _on(ctx: _Ctx, m: Mapping[str, Any], segment_names: set[str]) -> On:
    v = m["on"]
    if isinstance(v, str):
        return On("event", event_type=_type_name(ctx, v, "on", m, "on"))
    kinds = {"segment_enter", "segment_exit", "timeout"}
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in kinds:
        raise ctx.error("'on' must be an event type, {segment_enter: NAME}, {segment_exit: NAME} or "
                        "{timeout: {after: A, no: B, within_s: T}}", "on", m, "on")
    kind, arg = next(iter(v.items()))
    if kind in ("segment_enter", "segment_exit"):
        if not isinstance(arg, str) or arg not in segment_names:
            raise ctx.error(f"unknown segment {arg!r} (declared: {', '.join(sorted(segment_names)) or 'none'})",
                            f"on.{kind}", v, kind)
        return On(kind, segment=arg)
    if not isinstance(arg, dict):
        raise ctx.error("a timeout is {after: A, no: B, within_s: T}", "on.timeout", v, kind)
    _check_keys(ctx, arg, {"after", "no", "within_s"}, {"after", "no", "within_s"}, "on.timeout")
    no = arg["no"]
    nos = no if isinstance(no, list) else [no]
    if not nos:
        raise ctx.error("expected at least one event type", "on.timeout.no", arg, "no")
    return On("timeout", timeout=Timeout(
        _type_name(ctx, arg["after"], "on.timeout.after", arg, "after"),
        tuple(_type_name(ctx, x, "on.timeout.no", arg, "no") for x in nos),
        float(_number(ctx, arg, "within_s", "on.timeout.within_s", positive=True))))


def _trigger(path: str | None, m: Any, index: int, segment_names: set[str]) -> Trigger:
    ctx = _Ctx(path, "trigger", f"#{index + 1}", m)
    if not isinstance(m, dict):
        raise ctx.error("a trigger must be a mapping with name, on and action")
    ctx.rule = _name(ctx, m)
    _check_keys(ctx, m, {"name", "on", "when", "action", "cooldown_s", "once_per", "requires_consent", "description",
                         "experiment"}, {"name", "on", "action"}, None)
    on = _on(ctx, m, segment_names)
    when = ctx.expr(m.get("when", "true"), "when", want_bool=True)
    a = m["action"]
    if not isinstance(a, dict):
        raise ctx.error("an action is {type: NAME, payload: {...}}", "action", m, "action")
    _check_keys(ctx, a, {"type", "payload"}, {"type"}, "action")
    atype = a["type"]
    if not isinstance(atype, str) or not _NAME_RE.match(atype):
        raise ctx.error(f"an action type must be a name, got {atype!r}", "action.type", a, "type")
    payload = a.get("payload", {})
    if not isinstance(payload, dict):
        raise ctx.error("a payload is a mapping of names to CEL expressions or constants", "action.payload", a,
                        "payload")
    action = Action(atype, _template(ctx, payload, "action.payload", a, "payload"))
    cooldown = _number(ctx, m, "cooldown_s", "cooldown_s", default=0)
    once_per = m.get("once_per")
    if once_per is not None and once_per not in ONCE_PER:
        raise ctx.error(f"once_per must be one of {', '.join(ONCE_PER)}, got {once_per!r}", "once_per", m, "once_per")
    consent = m.get("requires_consent")
    if consent is not None and (not isinstance(consent, str) or not _NAME_RE.match(consent)):
        raise ctx.error(f"requires_consent must be a consent purpose name such as 'marketing', got {consent!r}",
                        "requires_consent", m, "requires_consent")
    experiment = _experiment(ctx, m["experiment"], on, action.payload) if "experiment" in m else None
    return Trigger(ctx.rule, on, when, action, float(cooldown), once_per, consent, str(m.get("description", "")),
                   experiment)


def _experiment(ctx: _Ctx, e: Any, on: On, payload: Template) -> Experiment:
    """Validate and compile a trigger's ``experiment`` (see :mod:`clickpulse.experiments.assignment`)."""
    if not isinstance(e, dict):
        raise ctx.error("an experiment is {name, variants, holdout, window_s, salt, conversion}", "experiment")
    _check_keys(ctx, e, {"name", "salt", "holdout", "window_s", "conversion", "variants", "description",
                         "allocation"}, {"name"}, "experiment")
    allocation = e.get("allocation", "fixed")
    if allocation not in ("fixed", "thompson"):
        raise ctx.error(f"allocation is fixed or thompson, got {allocation!r}", "experiment.allocation", e,
                        "allocation")
    name = e["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ctx.error(f"an experiment name must be a name, got {name!r}", "experiment.name", e, "name")
    salt = e.get("salt", name)
    if not isinstance(salt, str) or not salt:
        raise ctx.error(f"salt must be a non-empty string, got {salt!r}", "experiment.salt", e, "salt")
    holdout = _number(ctx, e, "holdout", "experiment.holdout", default=0.0)
    if not holdout < 1:
        raise ctx.error(f"holdout is a share in [0, 1), got {holdout!r}", "experiment.holdout", e, "holdout")
    window = _number(ctx, e, "window_s", "experiment.window_s", default=7 * 86400.0, positive=True)
    conv = e.get("conversion", "purchase")
    convs = conv if isinstance(conv, list) else [conv]
    if not convs:
        raise ctx.error("expected at least one event type", "experiment.conversion", e, "conversion")
    types = tuple(_type_name(ctx, x, "experiment.conversion", e, "conversion") for x in convs)
    raw = e.get("variants", [{"name": "treatment", "weight": 1}])
    if not isinstance(raw, list) or not raw:
        raise ctx.error("variants is a non-empty list of {name, weight, payload, offer, delay_s}",
                        "experiment.variants", e, "variants")
    variants = []
    for i, v in enumerate(raw):
        where = f"experiment.variants[{i}]"
        if not isinstance(v, dict):
            raise ctx.error("a variant is {name, weight, payload, offer, delay_s}", where, e, "variants")
        _check_keys(ctx, v, {"name", "weight", "payload", "offer", "delay_s", "description"}, {"name"}, where)
        vname = v["name"]
        if not isinstance(vname, str) or not _NAME_RE.match(vname) or vname == HOLDOUT:
            raise ctx.error(f"a variant name must be a name other than {HOLDOUT!r}, got {vname!r}", f"{where}.name",
                            v, "name")
        if any(x.name == vname for x in variants):
            raise ctx.error(f"duplicate variant name {vname!r}", f"{where}.name", v, "name")
        weight = _number(ctx, v, "weight", f"{where}.weight", default=1, positive=True)
        overrides = v.get("payload", {})
        if not isinstance(overrides, dict):
            raise ctx.error("a variant's payload is a mapping of the payload fields it overrides",
                            f"{where}.payload", v, "payload")
        template = None
        if overrides or "offer" in v:
            if not isinstance(payload, dict):
                raise ctx.error("payload overrides need a mapping payload", f"{where}.payload", v, "payload")
            template = dict(payload)
            template.update(_template(ctx, overrides, f"{where}.payload", v, "payload"))
            if "offer" in v:  # shorthand for payload: {offer: ...}
                template["offer"] = _template(ctx, v["offer"], f"{where}.offer", v, "offer")
        delay = None
        if "delay_s" in v:
            if allocation == "thompson":
                raise ctx.error("delay_s needs the arm when the timer is armed: not with allocation: thompson "
                                "(the arm is drawn when the trigger fires)", f"{where}.delay_s", v, "delay_s")
            if on.kind != "timeout":
                raise ctx.error("delay_s overrides a timeout's within_s: only for an on: {timeout: ...} trigger",
                                f"{where}.delay_s", v, "delay_s")
            delay = float(_number(ctx, v, "delay_s", f"{where}.delay_s", positive=True))
        variants.append(Variant(vname, float(weight), template, delay))
    return Experiment(name, salt, tuple(variants), float(holdout), float(window), types, allocation)


def _unique(ctx: _Ctx, items: list[Any], kind: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.name in seen:
            raise RulesError(f"duplicate {kind} name", path=ctx.path, rule=it.name, kind=kind)
        seen.add(it.name)


def parse_rules(data: bytes | str, path: str | None = None) -> Ruleset:
    """Parse, validate and compile a rules file's content.

    Raises
    ------
    RulesError
        Invalid YAML, a malformed rule, or an invalid CEL expression (rule, field, position,
        reason in the message).
    """
    raw = data.encode() if isinstance(data, str) else data
    digest = hashlib.sha256(raw).hexdigest()
    try:
        doc = yaml.load(raw, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        parts = (getattr(err, "context", None), getattr(err, "problem", None))
        reason = " ".join(str(x) for x in parts if x) or str(err)
        raise RulesError(f"invalid YAML: {reason}", path=path, line=None if mark is None else mark.line + 1,
                         column=None if mark is None else mark.column + 1) from err
    ctx = _Ctx(path, node=doc)
    if not isinstance(doc, dict):
        raise RulesError("a rules file is a mapping with version, segments and triggers", path=path)
    _check_keys(ctx, doc, {"version", "segments", "triggers", "description"}, {"version"}, None)
    version = doc["version"]
    if not isinstance(version, str) or not version.strip():
        raise ctx.error(f"version must be a non-empty string, got {type(version).__name__} {version!r} "
                        f"(quote it, e.g. version: \"2026-11-01.1\")", "version", doc, "version")
    lists = {}
    for key in ("segments", "triggers"):
        v = doc.get(key) or []
        if not isinstance(v, list):
            raise ctx.error(f"{key} must be a list", key, doc, key)
        lists[key] = v
    segments = [_segment(path, m, i) for i, m in enumerate(lists["segments"])]
    _unique(ctx, segments, "segment")
    names = {s.name for s in segments}
    triggers = [_trigger(path, m, i, names) for i, m in enumerate(lists["triggers"])]
    _unique(ctx, triggers, "trigger")
    seen_experiments: dict[str, str] = {}
    for trig in triggers:
        if trig.experiment is not None:
            other = seen_experiments.setdefault(trig.experiment.name, trig.name)
            if other != trig.name:
                raise RulesError(f"experiment {trig.experiment.name!r} is already declared by trigger {other!r}",
                                 path=path, rule=trig.name, kind="trigger", field="experiment.name")
    file_version = version.strip()
    warnings = []
    for trig in triggers:
        types = [trig.on.event_type] if trig.on.kind == "event" else \
            [trig.on.timeout.after, *trig.on.timeout.no] if trig.on.timeout is not None else []
        for etype in types:
            if etype not in CANONICAL_TYPES:
                warnings.append(f"trigger {trig.name!r}: {etype!r} is not a canonical event type "
                                f"({', '.join(sorted(CANONICAL_TYPES))}); it only matches events sent with "
                                f"exactly that type")
    for kind, items in (("segment", segments), ("trigger", triggers)):
        for item in items:
            for etype in sorted({m.group(1) for src in _sources(item) for m in _COUNT_TYPE_RE.finditer(src)}):
                if etype not in CANONICAL_TYPES:
                    warnings.append(f"{kind} {item.name!r}: count.{etype} is not a canonical event type; it is "
                                    f"a runtime error (the condition is false) until such events arrive")
    for trig in triggers:
        purpose = trig.requires_consent
        if purpose is not None and purpose not in COMMON_PURPOSES:
            warnings.append(f"trigger {trig.name!r}: requires_consent {purpose!r} is not a common purpose "
                            f"({', '.join(COMMON_PURPOSES)}); it is granted only by consent events with "
                            f"exactly this purpose (or CLICKPULSE_ASSUME_CONSENT)")
    for w in warnings:
        log.warning("rules %s: %s", path, w)
    return Ruleset(f"{file_version}+{digest[:8]}", file_version, digest, tuple(segments), tuple(triggers), path,
                   tuple(warnings))


def _sources(item: Segment | Trigger) -> list[str]:
    """Every CEL source of a rule (condition and payload values)."""
    out = [item.when.source]
    stack = list(item.templates) if isinstance(item, Trigger) else []
    while stack:
        v = stack.pop()
        if isinstance(v, Expr):
            out.append(v.source)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


def load_rules(path: str | Path) -> Ruleset:
    """Load a rules file (see :func:`parse_rules`); an unreadable file is a :class:`RulesError`."""
    p = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise RulesError(f"cannot read the rules file: {err.strerror or err}", path=p) from err
    return parse_rules(data, p)


class RulesFile:
    """The active ruleset of a rules file, reloaded without a restart.

    ``RulesFile(path)`` loads the file (a :class:`RulesError` if it is invalid: there is nothing
    to fall back on yet). :meth:`poll` re-reads it (rules files are small) and, when its SHA-256
    changed, compiles it: a valid file becomes :meth:`current`; an invalid or unreadable one
    leaves the previous ruleset active and is recorded in :attr:`error` (and logged once per
    distinct bad content). Call ``poll()`` every few seconds from the worker.

    Attributes
    ----------
    error : RulesError | None
        Why the file's current content is not the active ruleset; ``None`` when it is.
    reloads : int
        Successful reloads since the first load.
    failures : int
        Rejected reloads (each distinct bad content counted once).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._ruleset = load_rules(self.path)
        self._failed_key: str | None = None  # hash (or read error) of the last rejected content
        self.error: RulesError | None = None
        self.reloads = 0
        self.failures = 0

    def current(self) -> Ruleset:
        """The active ruleset."""
        return self._ruleset

    def poll(self) -> bool:
        """Reload when the file's content changed; True when a new ruleset became active."""
        try:
            data = self.path.read_bytes()
        except OSError as err:
            self._fail(RulesError(f"cannot read the rules file: {err.strerror or err}", path=str(self.path)),
                       f"unreadable: {err.strerror or err}")
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._ruleset.content_hash:
            self.error = None  # the file is back to the active content
            self._failed_key = None
            return False
        if digest == self._failed_key:
            return False
        try:
            new = parse_rules(data, str(self.path))
        except RulesError as err:
            self._fail(err, digest)
            return False
        log.info("rules %s: version %s active (was %s)", self.path, new.version, self._ruleset.version)
        self._ruleset = new
        self.error = None
        self._failed_key = None
        self.reloads += 1
        return True

    def _fail(self, err: RulesError, key: str) -> None:
        if key != self._failed_key:  # count and log each distinct failure once
            self.failures += 1
            log.warning("rules %s: reload rejected, keeping version %s: %s", self.path, self._ruleset.version, err)
        self.error = err
        self._failed_key = key
