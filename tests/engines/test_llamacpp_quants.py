"""Every GGUF type users run, made by llama.cpp's own quantizer, through a job; the extra-buffers decision on
recorded CPUs."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_all, write_shard

from runner.cluster.ray import RunOptions
from runner.engines.base import Request
from runner.engines.llamacpp.generate import LlamaCppEngine
from runner.engines.llamacpp.lib import use_extra_buffers
from runner.hardware import cpu_flags, describe_cpu, has_amx
from runner.job import run_job
from runner.spec.job import parse_spec
from runner.spec.sampling import Sampling
from runner.tinymodel import LLAMA_QUANTS, TinyConfig, write_tiny_model

CPUINFO = Path(__file__).parent.parent / "data" / "cpuinfo"
QUANTS = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS"]


@pytest.fixture(scope="module")
def quant_models(tmp_path_factory) -> dict[str, str]:
    """The wide tiny model (256-wide rows, so K- and I-quants apply to every matrix) in each type."""
    folder = tmp_path_factory.mktemp("quants")
    return {q: write_tiny_model(folder / f"tiny-{q}.gguf", TinyConfig.wide(quant=q)) for q in QUANTS}


def tensor_types(path: str) -> set[str]:
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}


def test_each_type_is_made_as_asked(quant_models):
    assert set(QUANTS) <= set(LLAMA_QUANTS)
    assert tensor_types(quant_models["Q4_0"]) >= {"Q4_0"}
    assert tensor_types(quant_models["Q4_K_M"]) >= {"Q4_K"}  # with Q6_K for some, as llama.cpp's mix has it
    assert tensor_types(quant_models["Q5_K_M"]) >= {"Q5_K"}
    assert tensor_types(quant_models["Q6_K"]) >= {"Q6_K"}
    assert tensor_types(quant_models["IQ4_XS"]) >= {"IQ4_XS"}
    assert tensor_types(quant_models["F16"]) == {"F16"}
    assert tensor_types(quant_models["BF16"]) == {"BF16"}


@pytest.mark.parametrize("quant", QUANTS)
def test_each_quant_type_runs_a_job(ray_local, quant_models, tmp_path, quant):
    rows = 12
    write_shard(tmp_path / "in.parquet", [f"write a short story about the price {i}" for i in range(rows)])
    spec, resolved = parse_spec({
        "name": f"quant-{quant.lower()}", "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out")}, "sampling": {"max_tokens": 8}, "unit_rows": 4,
        "workers": [{"engine": "llamacpp", "model": quant_models[quant], "n_ctx": 128, "parallel": 4,
                     "num_cpus": 1}]}, env={})
    manifest = run_job(spec, resolved, RunOptions(progress=False))
    assert manifest["status"] == "succeeded" and manifest["rows_failed"] == 0
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["source_row"] for r in out) == list(range(rows))
    assert all(r["error"] is None and r["completion_tokens"] > 0 for r in out)


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_K_M"])
def test_extra_buffers_on_and_off_both_decode(quant_models, quant):
    """With repacking (on, where this CPU allows it) and without (off, as on an AMX CPU): both decode every row,
    and batched greedy rows equal single-sequence ones within each setting."""
    requests = [Request(i, f"the quality of service {i} was", Sampling(max_tokens=6)) for i in range(6)]
    for setting in ("on", "off"):
        batched = LlamaCppEngine(quant_models[quant], n_ctx=128, parallel=4, extra_buffers=setting)
        single = LlamaCppEngine(quant_models[quant], n_ctx=128, parallel=1, prefix_reuse=False,
                                extra_buffers=setting)
        try:
            got, want = run_all(batched, requests), run_all(single, requests)
        finally:
            batched.close()
            single.close()
        assert all(c.error is None and c.completion_tokens for c in got.values())
        assert {i: c.text for i, c in got.items()} == {i: c.text for i, c in want.items()}, setting


def recorded(name: str) -> frozenset[str]:
    return cpu_flags((CPUINFO / name).read_text())


def test_the_extra_buffers_decision_on_recorded_cpus():
    spr, genoa, rome, graviton = (recorded(n) for n in ("sapphire_rapids.txt", "epyc_avx512.txt",
                                                         "epyc_rome_avx2.txt", "graviton3_arm.txt"))
    assert has_amx(spr) and not any(has_amx(f) for f in (genoa, rome, graviton))
    assert use_extra_buffers("auto", spr) is False  # llama.cpp's AMX path crashes on quantized weights
    assert use_extra_buffers("auto", genoa) and use_extra_buffers("auto", rome) and use_extra_buffers("auto", graviton)
    assert use_extra_buffers("on", spr) is True and use_extra_buffers("off", rome) is False
    assert describe_cpu(spr) == "AVX2 AVX512 AVX512_VNNI AVX512_BF16 AMX_INT8 AMX_BF16"
    assert describe_cpu(rome) == "AVX2"
    assert describe_cpu(graviton) == "NEON SVE I8MM"
    assert describe_cpu(frozenset()) == "unknown"


def test_no_cpuinfo_assumes_no_amx():
    assert cpu_flags("") == frozenset()
    assert use_extra_buffers("auto", frozenset()) is True


def test_this_machines_flags_are_read():
    flags = cpu_flags()
    if Path("/proc/cpuinfo").exists():
        assert flags and describe_cpu(flags) != "unknown"


def test_the_pool_key_reaches_every_model_load(monkeypatch, quant_models):
    """Generation, embedding and runner plan's vocabulary all load through model_params, with the pool's key."""
    import runner.engines.llamacpp.generate as generate
    import runner.engines.llamacpp.lib as lib
    from runner.estimate.tokens import LlamaTokens

    seen, real = [], lib.model_params

    def spy(ll, extra_buffers="auto", vocab_only=False):
        seen.append((extra_buffers, vocab_only))
        return real(ll, extra_buffers, vocab_only)

    monkeypatch.setattr(lib, "model_params", spy)  # every load goes through lib.load_model
    spec, _ = parse_spec({"name": "k", "input": {"path": "/in.parquet"}, "output": {"path": "/out"}, "task": "embed",
                          "workers": [{"engine": "llamacpp", "model": quant_models["Q4_0"], "extra_buffers": "off"}]},
                         env={})
    pool = spec.workers[0]
    generate.LlamaCppEngine.from_pool(pool, spec).close()  # task embed: the embedder
    generate.LlamaCppEngine.from_pool(pool, spec.model_copy(update={"task": "generate"})).close()
    LlamaTokens(pool, "p").close()
    assert seen == [("off", False), ("off", False), ("off", True)]
