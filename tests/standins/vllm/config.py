"""The stand-in's StructuredOutputsConfig: the one field the runner sets."""

from dataclasses import dataclass


@dataclass
class StructuredOutputsConfig:
    backend: str = "auto"
