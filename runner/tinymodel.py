"""Writes a small random-weight llama, as a GGUF (llama.cpp) or a Hugging Face directory (vLLM), same weights.

Tests, the quickstart and the benchmarks use it; nothing ever downloads a model.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Zephyr-style: llama.cpp recognises it by its <|assistant|> marker. It writes BOS itself, as Hugging Face
# templates do, so both engines tokenize a chat the same way.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no what up out into more "
    "other some time about only new like then them these can could my than first any may way its also "
    "write summary review product good bad great price quality service short story answer question user "
    "system assistant please summarize translate explain describe list sentence word text data model"
).split()
SPECIALS = ("<unk>", "<s>", "</s>")
WRITTEN = {"F32": 0, "Q8_0": 7, "BF16": 32}  # types gguf-py writes itself -> llama.cpp's file type
# The GGUF types users run, as llama.cpp's llama_ftype (LLAMA_FTYPE_MOSTLY_*), made by llama_model_quantize.
LLAMA_QUANTS = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ4_XS": 30, "BF16": 32}
SUPER_BLOCK = ("Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS")  # blocks of 256 weights: rows must be a multiple of 256


@dataclass(frozen=True)
class TinyConfig:
    """The model's shape. The default has vLLM's smallest CPU attention head (64) and loads in both engines."""

    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 2
    n_head_kv: int = 1
    n_ff: int = 256
    n_vocab: int = 0  # 0: just the base vocabulary; more pads it with synthetic pieces
    n_ctx_train: int = 4096
    quant: str = "Q8_0"  # how the GGUF stores the matrices: Q8_0, exactly as the Hugging Face files (BF16, F32),
    # or any LLAMA_QUANTS type, quantized from F32 by llama.cpp itself
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def wide(cls, **over) -> TinyConfig:
        """A shape whose rows are multiples of 256, so K-quants and IQ4_XS quantize every matrix as asked
        (llama.cpp falls back to another type for a narrower row)."""
        return cls(**{"n_embd": 256, "n_head": 4, "n_ff": 512, **over})


def build_vocab(n_vocab: int = 0) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte-fallback pieces, characters, word pieces."""
    tokens = list(SPECIALS)
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # BYTE
    pieces: list[str] = ["▁"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
    for word in _WORDS:  # every prefix, so SentencePiece merges can reach the whole word
        w = "▁" + word
        pieces += [w[:i] for i in range(2, len(w) + 1)]
    seen = set(tokens)
    uniq = [p for p in pieces if not (p in seen or seen.add(p))]
    i = 0
    while n_vocab and len(tokens) + len(uniq) < n_vocab:
        a, b = string.ascii_lowercase[i % 26], string.ascii_lowercase[(i // 26) % 26]
        for piece in (f"▁{a}{b}", f"{a}{b}", f"▁{a}{b}{string.ascii_lowercase[(i // 676) % 26]}{i}"):
            if piece not in seen:
                seen.add(piece)
                uniq.append(piece)
        i += 1
    uniq = uniq[: n_vocab - len(tokens)] if n_vocab else uniq
    tokens += uniq
    types += [1] * len(uniq)  # NORMAL
    scores = [0.0] * 259 + [float(len(p)) - i * 1e-4 for i, p in enumerate(uniq)]
    return tokens, scores, types


def tiny_weights(config: TinyConfig) -> dict[str, np.ndarray]:
    """The model's tensors by their Hugging Face names and layout, as float32 arrays of bfloat16 values: the
    safetensors (bfloat16), a BF16 or F32 GGUF hold exactly these; a Q8_0 GGUF is their 8-bit quantization."""
    c, rng = config, np.random.default_rng(config.seed)
    n_vocab = len(build_vocab(c.n_vocab)[0])
    kv = c.n_head_kv * c.head_dim

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        bits = _bf16_bits(rng.standard_normal((rows, cols), dtype=np.float32) * scale)
        return (bits.astype(np.uint32) << 16).view(np.float32)

    def norm() -> np.ndarray:
        return np.ones(c.n_embd, dtype=np.float32)

    out = {"model.embed_tokens.weight": matrix(n_vocab, c.n_embd, 1.0)}
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm()
        out[p + "self_attn.q_proj.weight"] = matrix(c.n_embd, c.n_embd, c.n_embd**-0.5)
        out[p + "self_attn.k_proj.weight"] = matrix(kv, c.n_embd, c.n_embd**-0.5)
        out[p + "self_attn.v_proj.weight"] = matrix(kv, c.n_embd, c.n_embd**-0.5)
        out[p + "self_attn.o_proj.weight"] = matrix(c.n_embd, c.n_embd, c.n_embd**-0.5)
        out[p + "post_attention_layernorm.weight"] = norm()
        out[p + "mlp.gate_proj.weight"] = matrix(c.n_ff, c.n_embd, c.n_embd**-0.5)
        out[p + "mlp.up_proj.weight"] = matrix(c.n_ff, c.n_embd, c.n_embd**-0.5)
        out[p + "mlp.down_proj.weight"] = matrix(c.n_embd, c.n_ff, c.n_ff**-0.5)
    out["model.norm.weight"] = norm()
    # Logits with a spread of a few units keep greedy choices far from ties.
    out["lm_head.weight"] = matrix(n_vocab, c.n_embd, 3.0 * c.n_embd**-0.5)
    return out


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout (an 8-byte header length, a JSON header, raw little-endian data), in bfloat16."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, data in tensors.items():
        blob = _bf16_bits(data).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(data.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for blob in blobs:
            f.write(blob)


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half query/key rows into llama.cpp's interleaved order (as convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str | os.PathLike, config: TinyConfig = TinyConfig()) -> str:
    """Write the tiny llama as a GGUF at `path` (a local file) and return the path."""
    c = config
    if c.quant not in WRITTEN:
        return quantize_gguf(write_tiny_gguf(f"{path}.f32", dataclasses.replace(c, quant="F32")), path, c.quant)
    import gguf

    tokens, scores, types = build_vocab(config.n_vocab)
    qtype = getattr(gguf.GGMLQuantizationType, c.quant)
    tmp = f"{path}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("runner-tiny-llama")
    w.add_context_length(c.n_ctx_train)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(WRITTEN[c.quant])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, data in tiny_weights(c).items():
        if ".q_proj." in name:
            data = _rope_permute(data, c.n_head)
        elif ".k_proj." in name:
            data = _rope_permute(data, c.n_head_kv)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), data)
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return str(path)


def quantize_gguf(source: str, path: str | os.PathLike, quant: str, remove_source: bool = True) -> str:
    """Quantize a GGUF with llama.cpp's own llama_model_quantize (as its llama-quantize tool does)."""
    from runner.engines.llamacpp.lib import llama_lib, quiet_logs

    if quant not in LLAMA_QUANTS:
        raise ValueError(f"quant: expected one of {', '.join(LLAMA_QUANTS)}, got {quant}")
    ll = llama_lib()
    quiet_logs(ll)
    params = ll.llama_model_quantize_default_params()
    params.ftype = LLAMA_QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    tmp = f"{path}.tmp{os.getpid()}"
    rc = ll.llama_model_quantize(source.encode(), tmp.encode(), ctypes.byref(params))
    if remove_source:
        os.remove(source)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {quant} failed with code {rc}")
    os.replace(tmp, path)
    return str(path)


def write_tiny_hf(path: str | os.PathLike, config: TinyConfig = TinyConfig()) -> str:
    """Write the tiny llama as a Hugging Face model directory (config.json, bfloat16 model.safetensors and a
    tokenizer.json that splits text as the GGUF's SentencePiece vocabulary does) and return its path."""
    c, final = config, Path(path)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokens, scores, _ = build_vocab(c.n_vocab)
    _write_safetensors(tmp / "model.safetensors", tiny_weights(c))
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c.n_embd, "intermediate_size": c.n_ff, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head_kv, "head_dim": c.head_dim,
        "max_position_embeddings": c.n_ctx_train, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "vocab_size": len(tokens), "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    }
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    _hf_tokenizer(tokens, scores).save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": c.n_ctx_train, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return str(final)


def _hf_tokenizer(tokens: list[str], scores: list[float]):
    """A byte-fallback BPE that merges as SentencePiece does: the pair whose joined piece scores highest
    first, so it splits text into the same pieces as llama.cpp's tokenizer of the GGUF."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    except ImportError:
        raise ImportError("writing a Hugging Face model needs the tokenizers package (it comes with vllm): "
                          "pip install tokenizers") from None

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=False):
        if piece in SPECIALS or piece.startswith("<0x"):
            continue
        merges += [(score, vocab[piece], piece[:i], piece[i:]) for i in range(1, len(piece))
                   if piece[:i] in vocab and piece[i:] in vocab]
    merges.sort(key=lambda m: (-m[0], m[1]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], unk_token="<unk>",
                              byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tk


def write_tiny_model(path: str | os.PathLike, config: TinyConfig = TinyConfig(), fmt: str | None = None) -> str:
    """Write the tiny llama at `path`: a GGUF when the path ends in .gguf (or fmt='gguf'), else a Hugging
    Face directory (fmt='hf')."""
    fmt = fmt or ("gguf" if str(path).endswith(".gguf") else "hf")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_tiny_gguf(path, config) if fmt == "gguf" else write_tiny_hf(path, config)
