"""How a row is generated: the sampling keys, shared by the job, its pools and each row's overrides."""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonSchemaFormat(_Model):
    """OpenAI's `response_format.json_schema`: a named JSON schema the text must follow."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field("response", description="The schema's name (OpenAI requires one; runner only reports it).")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema; it also types the `parsed` column.")
    description: str | None = Field(None, description="Free text, as in OpenAI's shape.")
    strict: bool | None = Field(None, description="Accepted for OpenAI compatibility; decoding is always constrained.")

    @field_validator("schema_")
    @classmethod
    def _expressible(cls, v: dict) -> dict:
        from runner.spec.schema import check_schema

        check_schema(v)
        return v


class ResponseFormat(_Model):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"] = Field(description="text, json_object or json_schema.")
    json_schema: JsonSchemaFormat | None = Field(None, description="Required with type json_schema.")

    @model_validator(mode="after")
    def _schema_with_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: give it exactly when type is json_schema")
        return self


# The keys that constrain a row's text (one at most), and the generate-only keys beyond them.
CONSTRAINT_KEYS = ("response_format", "regex", "choice", "grammar")
GENERATE_ONLY_KEYS = (*CONSTRAINT_KEYS, "logprobs", "n")


class Sampling(_Model):
    """How tokens are drawn; the job's default for every row."""

    max_tokens: int = Field(64, ge=1, description="Most new tokens per row.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 turns it off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")
    repeat_penalty: float = Field(1.0, gt=0.0, description="Repetition penalty (llama.cpp: over the last 64 tokens; "
                                                           "vLLM: its `repetition_penalty`); 1 turns it off.")
    presence_penalty: float = Field(0.0, description="Penalty for tokens already generated (vLLM takes -2 to 2).")
    frequency_penalty: float = Field(0.0, description="Penalty growing with a token's count (vLLM takes -2 to 2).")
    seed: int = Field(0, ge=0, description="Seed of the row's sampler; same seed, same text.")
    stop: list[str] = Field(default_factory=list, description="Strings (not empty) that end a row; never part of "
                                                              "`text`.")
    response_format: ResponseFormat | None = Field(
        None, description="OpenAI's shape: `{type: json_schema, json_schema: {name, schema}}` constrains decoding "
                          "to the schema and adds the typed `parsed` column; `{type: json_object}` to any JSON "
                          "object; `{type: text}` is plain text.")
    regex: str | None = Field(None, description="Constrain the text to match this regular expression.")
    choice: list[str] | None = Field(None, min_length=1, description="Constrain the text to one of these strings.")
    grammar: str | None = Field(None, description="Constrain the text to this GBNF grammar (llama.cpp's grammar "
                                                  "format, root rule `root`).")
    logprobs: int = Field(0, ge=0, le=20, description="k: the log-probability of each generated token and its k most "
                                                      "likely alternatives (the `logprobs` column); 0: none.")
    n: int = Field(1, ge=1, le=128, description="Completions per row (the `choices` column); give a temperature "
                                                "above 0 for different ones.")

    @model_validator(mode="after")
    def _one_constraint(self) -> Sampling:
        given = [k for k in CONSTRAINT_KEYS if getattr(self, k) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise ValueError(f"give one of response_format, regex, choice and grammar, not {' and '.join(given)}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n: {self.n} completions need a temperature above 0 (greedy decoding gives one text "
                             "n times; vLLM refuses it)")
        return self

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return v

    @cached_property  # asked for each finished row
    def constrained(self) -> bool:
        """Whether decoding follows a schema, a regex, a choice or a grammar."""
        fmt = self.response_format
        return (fmt is not None and fmt.type != "text") or any(
            v is not None for v in (self.regex, self.choice, self.grammar))

    @property
    def json_schema(self) -> dict | None:
        """The JSON schema the text must follow: the given one, {type: object} for json_object, else None."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        return fmt.json_schema.schema_ if fmt.json_schema else {"type": "object"}

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str]) -> list[str]:
        if "" in v:
            raise ValueError("an empty string would end every row at once")
        return v
