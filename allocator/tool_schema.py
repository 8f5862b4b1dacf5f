"""JSON Schemas of the agent tools, generated from their pydantic parameter models.

Three renderings of the same tools (``allocator tool --schema FORMAT``):

* ``native`` — ``{"format", "envelope", "tools": [{name, description, parameters}]}``: the
  schemas ``allocator tool`` itself validates every request against (draft 2020-12);
* ``anthropic`` — ``[{name, description, input_schema}]`` for the Messages API ``tools``;
* ``openai`` — ``[{"type": "function", "function": {name, description, parameters, "strict":
  true}}]`` for Chat Completions, valid for strict mode: every object closes with
  ``additionalProperties: false`` and lists all its properties as required, optional ones become
  nullable (null means "not given"), and keywords strict mode rejects are dropped. Free-form
  JSON (``metadata``, ``args``, ``kwargs``) cannot be described in strict mode, so there it is a
  string holding the JSON text; the tools accept either form.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

SCHEMA_FORMATS = ("native", "openai", "anthropic")
#: Keywords OpenAI's strict mode accepts; everything else is removed from the strict rendering.
OPENAI_STRICT_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "description", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minItems", "maxItems",
}
JSON_TEXT_NOTE = " In strict mode: the JSON text of the value, as a string."


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """Replaces local ``$ref``s by their definitions (the tool models are not recursive)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            merged = {**_inline(defs[ref.split("/")[-1]], defs), **{k: v for k, v in schema.items() if k != "$ref"}}
            return _inline(merged, defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(x, defs) for x in schema]
    return schema


def _drop_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "title" and isinstance(v, str):
                continue
            out[k] = {pk: _drop_titles(pv) for pk, pv in v.items()} if k == "properties" else _drop_titles(v)
        return out
    if isinstance(schema, list):
        return [_drop_titles(x) for x in schema]
    return schema


def _flatten(schema: Any) -> Any:
    """``anyOf: [{anyOf: [a, b]}, null]`` -> ``anyOf: [a, b, null]`` (pydantic nests annotated unions)."""
    if isinstance(schema, list):
        return [_flatten(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_flatten(v) if k != "properties" else {pk: _flatten(pv) for pk, pv in v.items()}) for k, v in schema.items()}
    if isinstance(out.get("anyOf"), list):
        flat: list[Any] = []
        for b in out["anyOf"]:
            if isinstance(b, dict) and set(b) <= {"anyOf", "description"} and "anyOf" in b:
                flat.extend(b["anyOf"])
            else:
                flat.append(b)
        out["anyOf"] = flat
    return out


def native_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema, self-contained (no ``$defs``) and without generated titles."""
    raw = model.model_json_schema()
    schema = _flatten(_drop_titles(_inline(raw, raw.get("$defs", {}))))
    schema.setdefault("properties", {})
    schema["additionalProperties"] = False
    return schema


def _is_free_form(s: dict[str, Any]) -> bool:
    """An object with arbitrary keys, or an array of anything: not expressible in strict mode."""
    if s.get("type") == "object":
        return not s.get("properties") and s.get("additionalProperties") is not False
    if s.get("type") == "array":
        items = s.get("items")
        return not isinstance(items, dict) or not items or items == {"type": "object"}
    return False


def _nullable(s: dict[str, Any]) -> dict[str, Any]:
    if "anyOf" in s:
        if not any(x.get("type") == "null" for x in s["anyOf"]):
            s["anyOf"].append({"type": "null"})
        return s
    if s.get("type") in ("string", "number", "integer", "boolean") and "enum" not in s:
        s["type"] = [s["type"], "null"]
        return s
    desc = s.pop("description", None)
    out: dict[str, Any] = {"anyOf": [s, {"type": "null"}]}
    if desc:
        out["description"] = desc
    return out


def _strict(s: Any) -> Any:
    if not isinstance(s, dict):
        return s
    if _is_free_form(s):
        return {"type": "string", "description": (s.get("description") or "JSON value.") + JSON_TEXT_NOTE}
    if "anyOf" in s:
        if any(_is_free_form(b) for b in s["anyOf"]):
            return {"type": "string", "description": (s.get("description") or "JSON value.") + JSON_TEXT_NOTE}
        branches = [_strict(b) for b in s["anyOf"] if b.get("type") != "null"]  # optional -> nullable below
        desc = s.get("description")
        if len(branches) == 1:
            return {**branches[0], **({"description": desc} if desc else {})}
        s = {**s, "anyOf": branches}
    out = {k: v for k, v in s.items() if k in OPENAI_STRICT_KEYWORDS}
    if "items" in out:
        out["items"] = _strict(out["items"])
    if out.get("type") == "object" or "properties" in out:
        props = s.get("properties", {})
        required = set(s.get("required", []))
        new_props = {}
        for name, sub in props.items():
            sub = _strict(copy.deepcopy(sub))
            new_props[name] = sub if name in required else _nullable(sub)
        out["properties"] = new_props
        out["required"] = list(new_props)
        out["additionalProperties"] = False
    return out


def openai_strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The strict-mode rendering of a native parameters schema (see the module docstring)."""
    return _strict(copy.deepcopy(schema))


def render(tools: list[tuple[str, str, dict[str, Any]]], fmt: str, envelope: dict[str, Any]) -> Any:
    """Tool definitions in ``fmt`` from (name, description, native parameters schema) triples."""
    if fmt == "native":
        return {"format": "rq-allocator-tools/1", "envelope": envelope,
                "tools": [{"name": n, "description": d, "parameters": p} for n, d, p in tools]}
    if fmt == "anthropic":
        return [{"name": n, "description": d, "input_schema": p} for n, d, p in tools]
    if fmt == "openai":
        return [{"type": "function", "function": {"name": n, "description": d, "parameters": openai_strict(p), "strict": True}}
                for n, d, p in tools]
    raise ValueError(f"unknown schema format {fmt!r}; expected one of {', '.join(SCHEMA_FORMATS)}")


def to_strict_arguments(params: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """How a strict-mode model would send ``params``: every property present (null when not
    given), free-form JSON as its text. Used by tests to prove the tools accept that form."""
    import json

    strict = openai_strict(schema)

    def convert(value: Any, native: dict[str, Any], st: dict[str, Any]) -> Any:
        if isinstance(value, dict) and "properties" in st and not _is_free_form(native):
            nprops = native.get("properties", {})
            return {k: (convert(value[k], _branch(nprops.get(k, {})), _branch(sp)) if k in value else None)
                    for k, sp in st["properties"].items()}
        if value is not None and _accepts_json_text(st) and not isinstance(value, str):
            return json.dumps(value)
        return value

    return convert(params, schema, strict)


def _branch(s: dict[str, Any]) -> dict[str, Any]:
    """The object branch of a nullable/union schema (for walking nested parameters)."""
    for b in s.get("anyOf", []):
        if b.get("type") == "object":
            return b
    return s


def _accepts_json_text(s: dict[str, Any]) -> bool:
    desc = s.get("description", "")
    return desc.endswith(JSON_TEXT_NOTE)
