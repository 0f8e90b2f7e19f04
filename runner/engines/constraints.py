"""Each generated row checked against its constraint: JSON schema, regex or choice."""

from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache

from runner.engines.base import Completion
from runner.errors import key_path
from runner.spec.sampling import Sampling


@lru_cache(maxsize=64)
def _validator(schema_json: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_json))


def check(completion: Completion, sampling: Sampling) -> Completion:
    """The completion with its constraint checked: `parsed` set for a JSON row that parses and validates, or an
    error of its own (json_incomplete, json_invalid, regex_mismatch, choice_mismatch) with the text kept."""
    if completion.error or completion.text is None or not sampling.constrained:
        return completion
    text, cut = completion.text, completion.finish_reason == "length"
    schema = sampling.json_schema
    if schema is not None:
        try:
            value = json.loads(text)
        except ValueError as e:
            kind = "json_incomplete" if cut else "json_invalid"
            return dataclasses.replace(completion, error=f"{kind}: {e}")
        problem = next(iter(_validator(json.dumps(schema, sort_keys=True)).iter_errors(value)), None)
        if problem is not None:
            where = key_path(problem.absolute_path, "$")
            return dataclasses.replace(completion, error=f"json_invalid: {where}: {problem.message[:200]}")
        return dataclasses.replace(completion, parsed=value)
    if sampling.regex is not None and not re.fullmatch(sampling.regex, text):
        return dataclasses.replace(completion, error=f"regex_mismatch: the text does not match {sampling.regex!r}")
    if sampling.choice is not None and text not in sampling.choice:
        return dataclasses.replace(completion, error="choice_mismatch: the text is none of the choices")
    return completion
