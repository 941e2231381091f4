"""Validation of the files resinspect reads back (results.json, sweep.json) against their JSON Schemas.

A small validator of the part of JSON Schema (draft 2020-12) that our schemas use — ``type``, ``properties``,
``required``, ``additionalProperties``, ``patternProperties``, ``items``, ``enum``, ``const``, ``pattern``,
``minimum``, ``maximum``, ``anyOf`` and local ``$ref`` — so that every read is checked the same way whether or not
the ``jsonschema`` package is installed (the tests check that the two agree). Each problem names the field
(``runs/0/seed``), what was expected and what was found.

    problems = validate(document, load_schema("sweep-schema.json"))
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["validate", "load_schema", "describe_problem"]

_SCHEMA_DIR = Path(__file__).parent
_TYPES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}
_KNOWN = {
    "$schema",
    "$id",
    "$defs",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "patternProperties",
    "items",
    "enum",
    "const",
    "pattern",
    "minimum",
    "maximum",
    "anyOf",
    "$ref",
    "default",
    "examples",
}


@cache
def load_schema(name: str) -> dict[str, Any]:
    """One of the schemas shipped with resinspect (``results-schema.json``, ``sweep-schema.json``)."""
    return json.loads((_SCHEMA_DIR / name).read_text(encoding="utf-8"))


def _is(kind: str, v: Any) -> bool:
    if kind == "object":
        return isinstance(v, dict)
    if kind == "array":
        return isinstance(v, list)
    if kind == "string":
        return isinstance(v, str)
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "null":
        return v is None
    if kind == "integer":
        return isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer())
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    raise ValueError(f"schema type {kind!r} is not supported")


def _shown(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(doc: Any, schema: dict[str, Any]) -> list[str]:
    """Every problem of ``doc`` against ``schema``, as ``"field/path: expected ..., got ..."`` (empty: valid)."""
    out: list[str] = []
    _check(doc, schema, schema, [], out)
    return out


def describe_problem(problems: list[str]) -> str:
    """The first problem, and how many more there are."""
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return problems[0] + more


def _check(v: Any, s: dict[str, Any], root: dict[str, Any], path: list[str], out: list[str]) -> None:
    where = "/".join(path) or "(top level)"
    unknown = set(s) - _KNOWN
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} are not supported by resinspect.schema")
    if "$ref" in s:
        ref = s["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"schema $ref {ref!r}: only local references are supported")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        _check(v, target, root, path, out)
    if "anyOf" in s:
        if not any(not validate_sub(v, alt, root) for alt in s["anyOf"]):
            out.append(f"{where}: {_shown(v)} matches none of the allowed forms")
            return
    if "type" in s:
        kinds = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_is(k, v) for k in kinds):
            expected = " or ".join(_TYPES[k] for k in kinds)
            out.append(f"{where}: expected {expected}, got {_shown(v)}")
            return
    if "const" in s and v != s["const"]:
        out.append(f"{where}: expected {_shown(s['const'])}, got {_shown(v)}")
    if "enum" in s and v not in s["enum"]:
        out.append(f"{where}: expected one of {', '.join(map(_shown, s['enum']))}; got {_shown(v)}")
    if isinstance(v, str) and "pattern" in s and re.search(s["pattern"], v) is None:
        out.append(f"{where}: {_shown(v)} does not have the expected form ({s['pattern']})")
    if _is("number", v):
        if "minimum" in s and v < s["minimum"]:
            out.append(f"{where}: expected at least {s['minimum']}, got {_shown(v)}")
        if "maximum" in s and v > s["maximum"]:
            out.append(f"{where}: expected at most {s['maximum']}, got {_shown(v)}")
    if isinstance(v, dict):
        _check_object(v, s, root, path, out)
    if isinstance(v, list) and "items" in s:
        for i, item in enumerate(v):
            _check(item, s["items"], root, path + [str(i)], out)


def _check_object(v: dict[str, Any], s: dict[str, Any], root: dict[str, Any], path: list[str], out: list[str]) -> None:
    where = "/".join(path) or "(top level)"
    for key in s.get("required", []):
        if key not in v:
            out.append(f"{where}: missing required field {key!r}")
    props = s.get("properties", {})
    patterns = s.get("patternProperties", {})
    extra = s.get("additionalProperties", True)
    for key, value in v.items():
        sub = path + [str(key)]
        matched = False
        if key in props:
            _check(value, props[key], root, sub, out)
            matched = True
        for pattern, ps in patterns.items():
            if re.search(pattern, key):
                _check(value, ps, root, sub, out)
                matched = True
        if not matched:
            if extra is False:
                allowed = ", ".join(sorted(props)) or ", ".join(f"names matching {p}" for p in patterns)
                out.append(f"{'/'.join(sub)}: unexpected field (allowed: {allowed})")
            elif isinstance(extra, dict):
                _check(value, extra, root, sub, out)


def validate_sub(v: Any, schema: dict[str, Any], root: dict[str, Any]) -> list[str]:
    out: list[str] = []
    _check(v, schema, root, [], out)
    return out
