"""The stand-in's StructuredOutputsConfig: the fields the runner sets."""

from dataclasses import dataclass


@dataclass
class StructuredOutputsConfig:
    backend: str = "auto"
    disable_any_whitespace: bool = False
