"""Writes small random-weight llama GGUF files with a working tokenizer and chat template.

Tests, the quickstart and the benchmarks use them; nothing ever downloads a model.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

import numpy as np

# Zephyr-style: llama.cpp recognises it by its <|assistant|> marker.
CHAT_TEMPLATE = (
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


@dataclass(frozen=True)
class TinyConfig:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_vocab: int = 0  # 0: just the base vocabulary; more pads it with synthetic pieces
    n_ctx_train: int = 4096
    quant: str = "Q8_0"  # or F32 / F16
    seed: int = 0


def build_vocab(n_vocab: int = 0) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte-fallback pieces, characters, word pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
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


def write_tiny_gguf(path: str | os.PathLike, config: TinyConfig = TinyConfig()) -> str:
    """Write a random-weight llama GGUF at `path` (a local file) and return the path."""
    import gguf

    tokens, scores, types = build_vocab(config.n_vocab)
    c, rng = config, np.random.default_rng(config.seed)
    head_dim = c.n_embd // c.n_head
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
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[c.quant])
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

    def matrix(name: str, rows: int, cols: int, scale: float) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * scale
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(c.n_embd, dtype=np.float32))

    kv = c.n_head_kv * head_dim
    matrix("token_embd.weight", len(tokens), c.n_embd, 1.0)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        matrix(p + "attn_q.weight", c.n_embd, c.n_embd, c.n_embd**-0.5)
        matrix(p + "attn_k.weight", kv, c.n_embd, c.n_embd**-0.5)
        matrix(p + "attn_v.weight", kv, c.n_embd, c.n_embd**-0.5)
        matrix(p + "attn_output.weight", c.n_embd, c.n_embd, c.n_embd**-0.5)
        norm(p + "ffn_norm.weight")
        matrix(p + "ffn_gate.weight", c.n_ff, c.n_embd, c.n_embd**-0.5)
        matrix(p + "ffn_up.weight", c.n_ff, c.n_embd, c.n_embd**-0.5)
        matrix(p + "ffn_down.weight", c.n_embd, c.n_ff, c.n_ff**-0.5)
    norm("output_norm.weight")
    # Logits with a spread of a few units keep greedy choices far from ties.
    matrix("output.weight", len(tokens), c.n_embd, 3.0 * c.n_embd**-0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return str(path)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-ff", type=int, default=128)
    ap.add_argument("--n-vocab", type=int, default=0)
    ap.add_argument("--quant", default="Q8_0", choices=["F32", "F16", "Q8_0"])
    a = ap.parse_args()
    cfg = TinyConfig(a.n_embd, a.n_layer, a.n_head, a.n_head_kv, a.n_ff, a.n_vocab, quant=a.quant)
    print(write_tiny_gguf(a.path, cfg))


if __name__ == "__main__":
    main()
