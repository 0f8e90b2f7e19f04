import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.tinymodel import CHAT_TEMPLATE, TinyConfig, build_vocab, tiny_weights, write_tiny_gguf, write_tiny_hf

TEXTS = ["Write a short summary of this review: the price was good.", "  two  spaces", "ünïcode ☃ and 日本",
         "the price is 42$!", "a", "<s><|user|>\nhello there</s>\n<|assistant|>\n"]


def test_writes_a_small_llama_gguf_with_tokenizer_and_template(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.chat_template"].parts[-1]).decode() == CHAT_TEMPLATE
    assert (tmp_path / "m.gguf").stat().st_size < 1_000_000
    assert any(t.name == "blk.1.ffn_down.weight" for t in reader.tensors)


def test_vocab_has_byte_fallback_and_reachable_words():
    tokens, scores, types = build_vocab()
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>" and types[3] == 6
    assert "▁the" in tokens and "▁th" in tokens and "▁t" in tokens
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types)


def test_vocab_can_be_padded_to_a_size():
    tokens, _, _ = build_vocab(2000)
    assert len(tokens) == 2000 and len(set(tokens)) == 2000


def test_same_seed_same_file(tmp_path):
    a = write_tiny_gguf(tmp_path / "a.gguf", TinyConfig(seed=3))
    b = write_tiny_gguf(tmp_path / "b.gguf", TinyConfig(seed=3))
    assert open(a, "rb").read() == open(b, "rb").read()


def test_the_hugging_face_directory_holds_exactly_the_ggufs_weights(tmp_path):
    """Read back with safetensors and gguf, the HF layout (q/k rows un-permuted for rope) equals the BF16 GGUF."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    hf = write_tiny_hf(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["head_dim"] == 64 and config["num_key_value_heads"] == 1 and config["torch_dtype"] == "bfloat16"
    tensors = load_file(f"{hf}/model.safetensors")
    expected = tiny_weights(TinyConfig())
    assert set(tensors) == set(expected) and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert all(np.array_equal(tensors[k].float().numpy(), v) for k, v in expected.items())

    reader = gguf.GGUFReader(write_tiny_gguf(tmp_path / "m.gguf", TinyConfig(quant="BF16")))
    by_name = {t.name: t for t in reader.tensors}
    q = by_name["blk.0.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.BF16
    data = gguf.quants.dequantize(q.data, q.tensor_type).reshape(128, 128)
    unpermuted = data.reshape(2, 32, 2, 128).swapaxes(1, 2).reshape(128, 128)  # llama.cpp's rope order undone
    assert np.array_equal(unpermuted, expected["model.layers.0.self_attn.q_proj.weight"])
    down = by_name["blk.1.ffn_down.weight"]
    assert np.array_equal(gguf.quants.dequantize(down.data, down.tensor_type).reshape(128, 256),
                          expected["model.layers.1.mlp.down_proj.weight"])


def test_the_hugging_face_tokenizer_splits_text_as_llama_cpp_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    from runner.engines.llamacpp.generate import LlamaCppEngine

    hf = write_tiny_hf(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    tokenizer = transformers.PreTrainedTokenizerFast(  # the files themselves: nothing is looked up anywhere
        tokenizer_file=f"{hf}/tokenizer.json", chat_template=config["chat_template"],
        **{k: config[k] for k in ("bos_token", "eos_token", "unk_token")})
    engine = LlamaCppEngine(write_tiny_gguf(tmp_path / "m.gguf"), n_ctx=256, parallel=1)
    try:
        for text in TEXTS:
            special = text.startswith("<s>")
            ours = engine.tokenize(text, add_special=not special, parse_special=special)
            assert tokenizer(text, add_special_tokens=not special)["input_ids"] == ours, text
    finally:
        engine.close()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == TEXTS[-1]


def test_make_tiny_model_writes_either_format(tmp_path):
    result = CliRunner().invoke(main, ["make-tiny-model", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0 and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    result = CliRunner().invoke(main, ["make-tiny-model", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
