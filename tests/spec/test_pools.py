"""Worker pools: one config class per engine, discriminated by `engine`; each pool's own checks."""

import pytest
from conftest import vllm_pool

from runner.errors import ModelError, SpecError
from runner.spec.job import check_models, parse_spec
from runner.spec.pools import EchoPool, LlamaCppPool, VLLMPool


def parse(*pools, unit_rows=64):
    raw = {"name": "j", "input": {"path": "/data/in/"}, "output": {"path": "/data/out/"}, "workers": list(pools),
           "unit_rows": unit_rows}
    return parse_spec(raw, env={})[0]


def test_each_engine_gets_its_own_class_and_defaults():
    spec = parse({"engine": "llamacpp", "model": "m.gguf"}, {"engine": "vllm", "model": "org/m"}, {"engine": "echo"})
    llama, vllm, echo = spec.workers
    assert isinstance(llama, LlamaCppPool) and isinstance(vllm, VLLMPool) and isinstance(echo, EchoPool)
    assert llama.model.startswith("/") and llama.parallel == 8 and llama.n_ctx == 2048 and llama.threads == 1
    assert vllm.model == "org/m" and vllm.num_gpus == 1 and vllm.engine_args == {}
    assert echo.parallel == 8 and echo.engine_args.step_s == 0 and echo.engine_args.crash_on is None
    assert spec.pool_names() == ["llamacpp0", "vllm1", "echo2"]


@pytest.mark.parametrize("pool, message", [
    ({"engine": "vllm"}, "workers[0].model: required key is missing"),
    ({"engine": "llamacpp"}, "workers[0].model: required key is missing"),
    ({"model": "m"}, "workers[0].engine: required key is missing (one of llamacpp, vllm, echo)"),
    ({"engine": "tgi", "model": "m"}, 'workers[0].engine: expected one of llamacpp, vllm, echo, got "tgi"'),
    ({"engine": "vllm", "model": "m", "parallel": 64},
     "workers[0]: parallel is a llamacpp and echo setting; for vllm set engine_args.max_num_seqs"),
    ({"engine": "vllm", "model": "m", "n_ctx": 4096},
     "workers[0]: n_ctx is a llamacpp setting; for vllm set engine_args.max_model_len"),
    ({"engine": "vllm", "model": "m", "kv_unified": True}, "workers[0]: kv_unified is a llamacpp setting"),
    ({"engine": "llamacpp", "model": "m", "engine_args": {"max_num_seqs": 8}},
     "workers[0]: engine_args is a vllm and echo setting; for llamacpp set its own keys (parallel, n_ctx, "
     "n_batch, ...)"),
    ({"engine": "echo", "model": "m"}, "workers[0]: model is a llamacpp and vllm setting"),
    ({"engine": "echo", "engine_args": {"step": 1}}, "workers[0].engine_args.step: unknown key"),
    ({"engine": "vllm", "model": "m", "bogus": 1}, "workers[0].bogus: unknown key"),
    ({"engine": "llamacpp", "model": "m.gguf", "parallel": 256},
     "workers[0]: parallel: llama.cpp holds at most 256 sequences, one of them the shared prefix when "
     "prefix_reuse is on; got 256"),
    ({"engine": "llamacpp", "model": "m", "chat_template": "{% if %}"},
     'workers[0].chat_template: not a valid Jinja template (line 1: Expected an expression, got \'end of '
     'statement block\'), got "{% if %}"'),
    ({"engine": "vllm", "model": "m", "num_gpus": 1, "engine_args": {"tensor_parallel_size": 2}},
     "workers[0]: num_gpus: vLLM with tensor x pipeline parallel size 2 needs 2 GPUs, got 1"),
    ({"engine": "vllm", "model": "m", "engine_args": {"tensor_parallel_size": "two"}},
     'workers[0].engine_args: tensor_parallel_size: expected an integer >= 1, got "two"'),
    ({"engine": "echo", "unit_rows": 100},
     "workers[0].unit_rows: expected a multiple of the job's unit_rows (64), got 100"),
])
def test_a_setting_the_engine_does_not_have_is_a_spec_error(pool, message):
    with pytest.raises(SpecError) as e:
        parse(pool)
    assert str(e.value) == f"job.yaml: {message}"


def test_vllm_pool_defaults():
    spec = parse(
        {"engine": "vllm", "model": "Qwen/Qwen2.5-0.5B"},
        {"engine": "vllm", "model": "./models/local", "engine_args": {"tensor_parallel_size": 2,
                                                                       "pipeline_parallel_size": 2}},
        {"engine": "vllm", "model": "m", "num_gpus": 0.5, "accelerator_type": "L4", "unit_rows": 512},
        unit_rows=128)
    hub, local, shared = spec.workers
    assert [spec.units_per_lease(i) for i in range(3)] == [1, 1, 4]
    assert hub.model == "Qwen/Qwen2.5-0.5B" and hub.num_gpus == 1  # a Hugging Face id stays as it is
    assert local.model.startswith("/") and local.model.endswith("/models/local") and local.num_gpus == 4
    assert local.gpus_per_replica == 4 and local.spans_nodes and not hub.spans_nodes
    assert shared.num_gpus == 0.5 and shared.accelerator_type == "L4"


def test_settings_that_change_outputs_change_the_fingerprint():
    def fp(pool):
        return parse(pool).fingerprint()

    vllm = {"engine": "vllm", "model": "m"}
    assert fp({**vllm, "engine_args": {"gpu_memory_utilization": 0.5}}) == fp(vllm) == fp({**vllm, "replicas": 3})
    assert fp({**vllm, "engine_args": {"max_model_len": 4096}}) != fp(vllm)
    assert fp({**vllm, "engine_args": {"dtype": "float16"}}) != fp(vllm)
    llama = {"engine": "llamacpp", "model": "m.gguf"}
    assert fp({**llama, "parallel": 16}) == fp(llama) != fp({**llama, "n_ctx": 512})


def test_a_local_vllm_model_must_be_a_hugging_face_directory(tmp_path):
    with pytest.raises(ModelError, match=r"workers\[0\].model: .*/nowhere does not exist"):
        check_models(parse({"engine": "vllm", "model": str(tmp_path / "nowhere")}))
    with pytest.raises(ModelError, match=r"workers\[0\].model: .* is not a Hugging Face model directory "
                                         r"\(no config.json\)"):
        check_models(parse({"engine": "vllm", "model": str(tmp_path)}))


def test_engine_args_are_checked_against_the_installed_vllm(tiny_hf_model):
    import vllm

    good = parse(vllm_pool(tiny_hf_model))
    check_models(good)
    with pytest.raises(SpecError) as e:
        check_models(parse(vllm_pool(tiny_hf_model, engine_args={"max_num_seq": 4})))
    assert str(e.value) == (f"workers[0].engine_args.max_num_seq: not an argument of vLLM {vllm.__version__}'s "
                            "EngineArgs (did you mean max_num_seqs?)")


def test_replicas_auto_and_its_limits():
    auto = parse({"engine": "echo", "replicas": "auto", "max_replicas": 8}).workers[0]
    assert auto.replicas == "auto" and auto.max_replicas == 8 and auto.planned_replicas == 8
    assert parse({"engine": "echo", "replicas": 3}).workers[0].planned_replicas == 3
    for pool, message in (
        ({"replicas": 0}, "workers[0].replicas: expected `auto` or an integer of at least 1, got 0"),
        ({"replicas": "many"}, "workers[0].replicas"),
        ({"replicas": 2, "max_replicas": 4}, "max_replicas: caps `replicas: auto`; this pool has a fixed replicas: 2"),
        ({"replicas": "auto", "num_cpus": 0}, "replicas: auto counts the replicas that fit by what one reserves"),
        ({"start_attempts": 0}, "workers[0].start_attempts"),
    ):
        with pytest.raises(SpecError) as e:
            parse({"engine": "echo", **pool})
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
