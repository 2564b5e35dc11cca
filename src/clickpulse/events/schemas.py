"""Loading the JSON Schemas shipped in ``schemas/`` (also installed as ``clickpulse/schemas``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator, FormatChecker

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_NAMES = ("event", "action", "dlq", "control", "profile", "example", "snapshot", "segment_change",
                "experiment", "segment_sizes")


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed ``schemas/<name>.v1.json``.

    Raises
    ------
    FileNotFoundError
        No such schema.
    """
    return orjson.loads((SCHEMA_DIR / f"{name}.v1.json").read_bytes())


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A Draft 2020-12 validator (with format checking) for ``schemas/<name>.v1.json``."""
    return Draft202012Validator(load_schema(name), format_checker=FormatChecker())


def validation_errors(name: str, instance: Any) -> list[str]:
    """Every violation of ``schemas/<name>.v1.json`` as ``"path: message"`` strings (empty = valid)."""
    out = []
    for err in validator(name).iter_errors(instance):
        path = ".".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{path}: {err.message}")
    return out
