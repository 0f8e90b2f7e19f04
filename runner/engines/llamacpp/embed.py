"""llama.cpp for task embed: whole prompts batched into one decode call, each pooled into one vector."""

from __future__ import annotations

import ctypes
from collections import deque

import numpy as np

from runner.engines.base import Completion, Refused, Request
from runner.engines.llamacpp.lib import llama_lib, load_model, tokenize
from runner.errors import EngineError, ModelError

_POOLING = {"mean": 1, "cls": 2, "last": 3}  # llama.cpp's LLAMA_POOLING_TYPE_*
_RANK = 4


class LlamaCppEmbedder:
    """Each step decodes as many whole waiting prompts as fit `n_batch` tokens (at most `parallel`, each in a
    sequence of its own, all in one ubatch), reads each sequence's pooled vector and clears the KV cache.

    `pooling` "model" takes the GGUF's own pooling type; a model that names none (a generative llama, like
    the tiny test model) is mean-pooled, as llama.cpp's embedding example does. A prompt may be up to `n_ctx`
    tokens: the ubatch holds that many, and a prompt longer than `n_batch` is decoded alone. Sequences in one
    ubatch share the KV cache, so attention (and its mask) grows with the square of the step's tokens: a
    moderate `n_batch` (the default 512) is faster than a huge one; flash attention skips the masked pairs.
    """

    def __init__(self, model_path: str, n_ctx: int = 2048, parallel: int = 8, n_threads: int = 1,
                 n_batch: int = 512, pooling: str = "model", normalize: bool = True, flash_attn: bool = False,
                 extra_buffers: str = "auto"):
        ll = self.ll = llama_lib()
        self.model = load_model(ll, model_path, extra_buffers)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.capacity, self.n_ctx, self.n_batch = parallel, n_ctx, n_batch
        self.n_ubatch = max(n_batch, n_ctx)  # one whole prompt always fits
        self.normalize, self.flash_attn = normalize, flash_attn
        self.pooling = self._pooling_type(pooling)
        self.embedding_dim = ll.llama_model_n_embd_out(self.model)
        # an encoder-only model (BERT and the like) runs through llama_encode
        self.encoder = ll.llama_model_has_encoder(self.model) and not ll.llama_model_has_decoder(self.model)
        self.ctx = ll.llama_init_from_model(self.model, self._context_params(n_threads))
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise EngineError(f"{model_path}: llama.cpp could not create an embedding context of "
                              f"{self.n_ubatch} tokens")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(self.n_ubatch, 0, 1)
        self.waiting: deque[tuple[Request, list[int]]] = deque()
        self.refused = Refused()

    def _pooling_type(self, pooling: str) -> int:
        if pooling != "model":
            return _POOLING[pooling]
        arch = _meta(self.ll, self.model, "general.architecture")
        value = _meta(self.ll, self.model, f"{arch}.pooling_type")
        kind = int(value) if value and value.lstrip("-").isdigit() else 0
        if kind == _RANK:
            self.ll.llama_model_free(self.model)
            raise ModelError("a reranking model (pooling type rank) gives scores, not embeddings")
        return kind if kind in _POOLING.values() else _POOLING["mean"]  # none or unspecified: mean

    def _context_params(self, n_threads: int):
        cp = self.ll.llama_context_default_params()
        # one batch at a time, cleared after each: a unified KV cache of one batch's tokens is enough
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_ubatch
        cp.n_seq_max = self.capacity
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.embeddings = True
        cp.pooling_type = self.pooling
        cp.flash_attn_type = 1 if self.flash_attn else 0
        cp.no_perf = True
        return cp

    # -- the engine protocol -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        tokens = self.tokenize(request.prompt or "")
        if not tokens:
            self.refused.add(request.id, "empty_prompt: no tokens to embed")
        elif len(tokens) > self.n_ctx:
            self.refused.too_long(request.id, len(tokens), self.n_ctx)
        else:
            self.waiting.append((request, tokens))

    def abort(self, request_id: int) -> None:
        self.waiting = deque(w for w in self.waiting if w[0].id != request_id)
        self.refused.drop(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.refused)

    def step(self) -> list[Completion]:
        """One decode call over the next whole prompts; returns their vectors (and rows that failed earlier)."""
        done = self.refused.take()
        taken = self._fill()
        if not taken:
            return done
        run = self.ll.llama_encode if self.encoder else self.ll.llama_decode
        rc = run(self.ctx, self.batch)
        if rc != 0:
            raise EngineError(f"llama.cpp failed with code {rc} on an embedding batch of {self.batch.n_tokens} tokens")
        for seq_id, (request, tokens) in enumerate(taken):
            done.append(Completion(request.id, None, None, len(tokens), embedding=self._vector(seq_id)))
        if self.memory:  # an encoder-only model keeps no KV cache
            self.ll.llama_memory_clear(self.memory, True)
        return done

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            self.ll.llama_model_free(self.model)
            self.ctx = self.model = None

    # -- internals -----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.ll, self.vocab, text)

    def _fill(self) -> list[tuple[Request, list[int]]]:
        """Whole prompts in queue order while they fit n_batch (the first always fits); prompt i is sequence i."""
        b, n, taken = self.batch, 0, []
        while self.waiting and len(taken) < self.capacity and (not n or n + len(self.waiting[0][1]) <= self.n_batch):
            request, tokens = self.waiting.popleft()
            seq_id = len(taken)
            for pos, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, True
                b.seq_id[n][0] = seq_id
                n += 1
            taken.append((request, tokens))
        b.n_tokens = n
        return taken

    def _vector(self, seq_id: int) -> np.ndarray:
        ptr = self.ll.llama_get_embeddings_seq(self.ctx, seq_id)
        if not ptr:
            raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
        vector = np.ctypeslib.as_array(ptr, shape=(self.embedding_dim,)).astype(np.float32)  # a copy
        norm = float(np.linalg.norm(vector))
        return vector / norm if self.normalize and norm > 0 else vector


def _meta(ll, model, key: str) -> str | None:
    """A GGUF metadata value as text, None when the key is absent."""
    buf = ctypes.create_string_buffer(256)
    n = ll.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None
