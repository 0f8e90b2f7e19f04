"""Structured outputs after decoding: a JSON schema's Arrow type, and each row's text checked and parsed.

The engines constrain decoding (llama.cpp grammars, vLLM's structured outputs); this module is the one place
that turns a schema into the `parsed` column's type and decides whether a row's text met its constraint.
Schemas whose values cannot be one Arrow column (a `oneOf` of different types, a free-form object) are
refused at validate, naming the place in the schema.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from runner.errors import key_path

_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


class SchemaError(ValueError):
    """A schema runner cannot turn into an Arrow type; the message starts with the place in the schema."""


def check_schema(schema: dict) -> None:
    """Raise ValueError naming the first place in `schema` that is not a valid JSON schema or has no Arrow type."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError as InvalidSchema

    try:
        Draft202012Validator.check_schema(schema)
    except InvalidSchema as e:
        where = key_path(e.path, "$")
        raise ValueError(f"{where}: not a valid JSON schema ({e.message})") from None
    arrow_type(schema)


def arrow_type(schema: dict) -> pa.DataType:
    """The Arrow type of the values `schema` admits: object -> struct, array -> list, string or enum -> string,
    integer -> int64, number -> float64, boolean -> bool. Raises SchemaError naming the place otherwise."""
    return _type(schema, schema, "$", ())


def _type(node: Any, root: dict, where: str, seen: tuple) -> pa.DataType:
    if node is True or node == {}:
        raise SchemaError(f"{where}: any JSON value is allowed here, which no one column type holds; give it a type")
    if not isinstance(node, dict):
        raise SchemaError(f"{where}: expected a schema object")
    if "$ref" in node:
        ref = node["$ref"]
        if ref in seen:
            raise SchemaError(f"{where}: {ref} refers to itself; a recursive schema has no fixed column type")
        return _type(_resolve(root, ref, where), root, where, seen + (ref,))
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node[key] if not (isinstance(o, dict) and o.get("type") == "null")]
            types = {str(_type(o, root, f"{where}.{key}[{i}]", seen)) for i, o in enumerate(options)}
            if len(types) != 1:
                raise SchemaError(f"{where}.{key}: its options have different types ({', '.join(sorted(types))}); "
                                  "one column needs one type")
            return _type(options[0], root, f"{where}.{key}[0]", seen)
    if "allOf" in node:
        raise SchemaError(f"{where}.allOf: not supported; merge its schemas into one")
    kind = _kind(node, where)
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        items = node.get("items")
        if items is None or "prefixItems" in node:
            raise SchemaError(f"{where}: an array needs `items` with one schema for its column type")
        return pa.list_(_type(items, root, f"{where}.items", seen))
    props = node.get("properties") or {}
    if not props:
        raise SchemaError(f"{where}: an object without properties has no fixed columns; list its properties")
    required = set(node.get("required") or ())
    return pa.struct([pa.field(name, _type(sub, root, f"{where}.properties.{name}", seen),
                               nullable=name not in required) for name, sub in props.items()])


def _kind(node: dict, where: str) -> str:
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise SchemaError(f"{where}.type: {kind} mixes types; one column needs one type")
        kind = kinds[0]
    if kind is None:
        values = node.get("enum", [node["const"]] if "const" in node else None)
        if values is None:
            if "properties" in node:
                return "object"
            raise SchemaError(f"{where}: give a type (string, integer, number, boolean, array or object)")
        kinds = {_json_kind(v) for v in values if v is not None}
        if len(kinds) != 1:
            raise SchemaError(f"{where}.enum: its values have different types; one column needs one type")
        kind = kinds.pop()
    if kind == "null":
        raise SchemaError(f"{where}: a value that is always null needs no column")
    if kind not in (*_SCALARS, "array", "object"):
        raise SchemaError(f"{where}.type: unknown type {kind!r}")
    return kind


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "null")


def _resolve(root: dict, ref: str, where: str) -> Any:
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise SchemaError(f"{where}.$ref: only references inside the schema (#/...) are supported, got {ref}")
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"{where}.$ref: {ref} names nothing in the schema")
        node = node[part]
    return node


def parsed_column(values: list[Any], type_: pa.DataType) -> pa.Array:
    """The `parsed` column: each row's value as `type_`; a value that does not fit (a row whose own schema
    differs from the job's) is null."""
    try:
        return pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        out = []
        for v in values:
            try:
                out.append(pa.array([v], type_)[0].as_py())
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
                out.append(None)
        return pa.array(out, type_)
