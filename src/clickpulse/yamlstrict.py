"""The strict YAML loader of clickpulse's configuration files (rules file, PII policy).

:class:`StrictLoader` is PyYAML's ``SafeLoader`` (no Python objects, ever) with two changes:

* **YAML 1.2 booleans**: only ``true``/``false`` (any case form) are booleans; YAML 1.1 also reads
  ``on``, ``off``, ``yes`` and ``no`` as booleans, which would turn a trigger's ``on:`` and
  ``no:`` keys — or a trait called ``no`` — into ``True`` and ``False``;
* **duplicate keys are an error** (a second ``properties:`` would silently replace the first),
  and every mapping is a :class:`YamlMap` that remembers its line and the line of each value, for
  error messages that point into the file.

>>> import yaml
>>> doc = yaml.load("on: add_to_cart\\nno: [purchase]\\n", Loader=StrictLoader)
>>> doc["on"], doc["no"], doc.key_lines["no"]
('add_to_cart', ['purchase'], 2)
>>> yaml.load("a: 1\\na: 2\\n", Loader=StrictLoader)
Traceback (most recent call last):
...
yaml.constructor.ConstructorError: duplicate key 'a'
  in "<unicode string>", line 2, column 1:
    a: 2
    ^
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class YamlMap(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers its line and the line of each value (1-based)."""

    line: int | None = None
    key_lines: dict[Any, int]


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, duplicate keys rejected and line numbers kept."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
StrictLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _construct_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> YamlMap:
    loader.flatten_mapping(node)
    out = YamlMap()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in out
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a key must be a string", key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = value_node.start_mark.line + 1
    return out


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
