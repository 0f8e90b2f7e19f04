"""The job.yaml key reference, generated from the spec's pydantic models so that a new key documents itself.

`reference_markdown()` walks JobSpec and every model nested in it (the pools through the union discriminated
by `engine`) and writes one table per model: key, type, default, description. The docs site's build hook
(docs/hooks.py) puts it into docs/reference.md; nothing generated is committed.
"""

from __future__ import annotations

import json
import re
import types
from collections import Counter
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runner.spec.job import JobSpec
from runner.storage.location import absolute_local

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any value"}
_BOUNDS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


@dataclass(frozen=True)
class Row:
    """One key of a table, and the model field it documents."""

    key: str
    type: str
    default: str
    description: str
    fields: tuple[tuple[type[BaseModel], str], ...]  # (model, field name) pairs this row stands for


@dataclass(frozen=True)
class Table:
    """One model's keys, under a heading that names where they sit in job.yaml."""

    anchor: str
    title: str
    intro: str
    rows: tuple[Row, ...]


def tables(root: type[BaseModel] = JobSpec) -> list[Table]:
    """Every table of the reference, depth first in declaration order, starting with `root`'s own keys."""
    table, below = _table(root, "", "")
    return [table, *below]


def reference_markdown(root: type[BaseModel] = JobSpec, level: int = 2) -> str:
    """The reference as Markdown: a heading and a table for each model under `root`."""
    out = []
    for table in tables(root):
        out.append(f"{'#' * level} {table.title} {{#{table.anchor}}}\n")
        if table.intro:
            out.append(table.intro + "\n")
        out.append("| key | type | default | description |\n| --- | --- | --- | --- |")
        out += [f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |" for r in table.rows]
        out.append("")
    return "\n".join(out)


def documented_fields(root: type[BaseModel] = JobSpec) -> list[tuple[type[BaseModel], str]]:
    """Every (model, field name) the reference shows a row for."""
    return [f for t in tables(root) for r in t.rows for f in r.fields]


def _table(model: type[BaseModel], label: str, suffix: str,
           names: tuple[str, ...] | None = None) -> tuple[Table, list[Table]]:
    """The table of `model`'s keys under `label` (`names`: only these), and the tables of the models in it."""
    rows, below = [], []
    for name in names if names is not None else tuple(model.model_fields):
        field = model.model_fields[name]
        key = field.alias or name
        sub = _join(label, key)
        members = _models(field.annotation)
        link = ""
        if len(members) == 1:
            table, more = _table(members[0], sub, suffix)
            below += [table, *more]
            link = f"[{sub}](#{table.anchor})"
        elif members:
            sub += "[]" if get_origin(field.annotation) is list else ""
            below += _union(members, sub)
            link = f"[{sub}](#{_anchor(sub)})"
        rows.append(Row(key, _type(field, link), _default(field), field.description or "", ((model, name),)))
    title = (f"`{label}`" if label else "Top level") + suffix
    return Table(_anchor(label + suffix), title, _doc(model), tuple(rows)), below


def _union(members: list[type[BaseModel]], label: str) -> list[Table]:
    """A union of models (the pools): the tag and the keys all members have once, as most members declare
    them, then each member's own keys, with a key it declares its own way (vLLM's num_gpus) among them."""
    tag = _discriminator(members)
    values = [get_args(m.model_fields[tag].annotation)[0] for m in members]
    shared = [n for n in members[0].model_fields if n != tag and all(n in m.model_fields for m in members)]
    usual = {n: Counter(_signature(m, n) for m in members).most_common(1)[0][0] for n in shared}
    rows = [Row(tag, "one of " + ", ".join(f"`{v}`" for v in values), "required",
                "; ".join(m.model_fields[tag].description or "" for m in members), tuple((m, tag) for m in members))]
    below = []
    for name in shared:
        alike = [m for m in members if _signature(m, name) == usual[name]]
        table, more = _table(alike[0], label, "", (name,))
        rows.append(replace(table.rows[0], fields=tuple((m, name) for m in alike)))
        below += more
    intro = f"The keys of every entry, whatever its `{tag}`; each {tag} has keys of its own, below."
    tables = [Table(_anchor(label), f"`{label}`: every entry", intro, tuple(rows)), *below]
    for member, value in zip(members, values, strict=True):
        own = tuple(n for n in member.model_fields
                    if n != tag and (n not in usual or _signature(member, n) != usual[n]))
        table, more = _table(member, label, f" with `{tag}: {value}`", own)
        tables += [table, *more]
    return tables


def _signature(model: type[BaseModel], name: str) -> tuple:
    field = model.model_fields[name]
    return repr(field.annotation), repr(field.metadata), field.description, _default(field)


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds, through Optional, Union, list and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def _discriminator(members: list[type[BaseModel]]) -> str:
    """The key whose Literal value tells the members apart (`engine` for the pools)."""
    for name in members[0].model_fields:
        if all(name in m.model_fields and get_origin(m.model_fields[name].annotation) is Literal for m in members):
            return name
    raise ValueError(f"no Literal key tells {', '.join(m.__name__ for m in members)} apart")


def _type(field: FieldInfo, link: str) -> str:
    text = _annotation(field.annotation, link)
    if any(getattr(m, "func", None) is absolute_local for m in field.metadata):
        text = "path or URL"  # PathOrUrl: a relative local path is taken from the current directory
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata for cls, attr, sign in _BOUNDS
              if isinstance(m, cls)]
    bounds += [f"at least {m.min_length} long" for m in field.metadata if isinstance(m, at.MinLen)]
    bounds += [f"matching `{m.pattern}`" for m in field.metadata if getattr(m, "pattern", None)]
    return ", ".join([text, *bounds])


def _annotation(annotation: Any, link: str) -> str:
    """An annotation in words: `integer`, `list of strings`, `one of generate, embed`, a link to a model's table."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"mapping: {link}"
    if origin is Annotated:
        return _annotation(args[0], link)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" if isinstance(a, str) else f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        models = _models(annotation)
        if len(models) > 1 and len(models) == len(kinds):
            return f"mapping, its keys by `{_discriminator(models)}`: {link}"
        words = [_annotation(a, link) for a in kinds] + (["null"] if len(kinds) < len(args) else [])
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    if origin in (list, tuple, set):
        item = _annotation(args[0], link) if args else "any value"
        return "list of " + (item.replace("mapping", "mappings", 1) if item.startswith("mapping")
                             else item if item.startswith(("one of", "list", "any")) else item + "s")
    if origin is dict:
        value = _annotation(args[1], link) if len(args) == 2 else "any value"
        return "mapping" if value == "any value" else f"mapping of string to {value}"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its keys' defaults"
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def _doc(model: type[BaseModel]) -> str:
    """The model's own docstring (not a base's), as one paragraph."""
    return " ".join((model.__dict__.get("__doc__") or "").split())


def _join(label: str, key: str) -> str:
    return f"{label}.{key}" if label else key


def _anchor(label: str) -> str:
    return "key-" + (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "top")


def _cell(text: str) -> str:
    """A table cell is one line, and a `|` in it would end the cell."""
    return " ".join(text.split()).replace("|", "\\|")
