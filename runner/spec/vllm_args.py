"""vLLM's EngineArgs names, read from the installed vLLM's source without importing it: a pool's
engine_args keys are checked against them in the driver in under a second."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util

from runner.errors import SpecError


def check_engine_arg_names(args: dict, where: str) -> None:
    """Each key must name a field of the installed vLLM's EngineArgs; raises SpecError naming the first that
    does not, with the closest field. Values are vLLM's to check when it builds the engine: building
    EngineArgs here would look the model up (on a hub, for an id)."""
    if not args:
        return
    fields, version = engine_arg_names()
    for key in args:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise SpecError(f"{where}.{key}: not an argument of vLLM {version}'s EngineArgs"
                            + (f" (did you mean {close[0]}?)" if close else ""))


def engine_arg_names() -> tuple[list[str], str]:
    """The installed vLLM's EngineArgs field names and its version, read from its source files (ast) rather
    than by importing vllm, which takes seconds and starts torch in the driver. Imports it only where the
    source is not laid out as expected (EngineArgs not a plain dataclass in vllm/engine/arg_utils.py)."""
    import ast
    from pathlib import Path

    root = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    try:
        tree = ast.parse((root / "engine" / "arg_utils.py").read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs")
        version = ast.literal_eval(next(
            n.value for n in ast.parse((root / "_version.py").read_text()).body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in n.targets)))
    except (OSError, SyntaxError, StopIteration, ValueError):
        cls = None
    if cls is None or cls.bases:  # inherited fields would be missed: ask vLLM itself
        import vllm

        return [f.name for f in dataclasses.fields(vllm.EngineArgs)], vllm.__version__
    return [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            and "ClassVar" not in ast.unparse(s.annotation)], str(version)
