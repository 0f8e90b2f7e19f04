import gguf

from runner.tinymodel import CHAT_TEMPLATE, TinyConfig, build_vocab, write_tiny_gguf


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
