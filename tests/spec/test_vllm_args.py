"""vLLM's EngineArgs names read from its source, without importing vLLM."""

import pytest


def test_engine_arg_names_are_read_from_vllms_source_without_importing_it():
    """The driver checks engine_args names from vLLM's source (ast): the same names as its EngineArgs, with no
    `import vllm` (seconds, and torch) in the driver."""
    import dataclasses
    import subprocess
    import sys

    from conftest import require_vllm

    code = ("import sys, json; from runner.spec.vllm_args import check_engine_arg_names, engine_arg_names; "
            "check_engine_arg_names({'max_num_seqs': 4}, 'x'); names, v = engine_arg_names(); "
            "print(json.dumps([names, v, 'vllm' in sys.modules, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, version, imported_vllm, imported_torch = __import__("json").loads(out.strip().splitlines()[-1])
    assert not imported_vllm and not imported_torch
    vllm = require_vllm()
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(vllm.EngineArgs))
    assert version == vllm.__version__


FAKE_ARG_UTILS = '''
from dataclasses import dataclass
from typing import ClassVar

@dataclass
class EngineArgs{bases}:
    model: str = "m"
    max_num_seqs: int | None = None
    registry: ClassVar[dict] = {{}}
'''


@pytest.mark.parametrize("bases", ["", "(Base)"])
def test_engine_arg_names_from_a_vllm_laid_out_otherwise_ask_vllm_itself(tmp_path, bases):
    """A plain dataclass is read from its source; one with a base class (fields it would inherit) is imported."""
    import subprocess
    import sys

    pkg = tmp_path / "vllm"
    (pkg / "engine").mkdir(parents=True)
    base = "from dataclasses import dataclass\n@dataclass\nclass Base:\n    inherited: int = 0\n"
    (pkg / "engine" / "arg_utils.py").write_text((base if bases else "") + FAKE_ARG_UTILS.format(bases=bases))
    (pkg / "_version.py").write_text("__version__ = version = '9.9.9'\n")
    (pkg / "__init__.py").write_text("import sys\nfrom vllm.engine.arg_utils import EngineArgs\n"
                                     "__version__ = '9.9.9'\nsys.stderr.write('imported\\n')\n")
    code = ("from runner.spec.vllm_args import check_engine_arg_names\n"
            "try:\n    check_engine_arg_names({'max_num_seq': 1}, 'w.engine_args')\n"
            "except Exception as e:\n    print(e)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == ("w.engine_args.max_num_seq: not an argument of vLLM 9.9.9's EngineArgs "
                                   "(did you mean max_num_seqs?)")
    assert ("imported" in proc.stderr) == bool(bases)
