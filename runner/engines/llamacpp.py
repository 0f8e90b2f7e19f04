"""llama.cpp engine: one context, `parallel` sequences decoded together in one llama_batch per step."""

from __future__ import annotations

import codecs
import ctypes
import os
from collections import deque
from dataclasses import dataclass, field

from runner.engines.base import Completion, Request
from runner.errors import EngineError, ModelError
from runner.spec import JobSpec, Sampling, WorkerPool


def _llama():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the node's install
        raise EngineError("engine llamacpp needs llama-cpp-python: pip install 'runner[cpu]'") from e
    return llama_cpp


@dataclass
class _Seq:
    """A request occupying one sequence slot of the context."""

    request: Request
    slot: int
    prompt: list[int]
    sampler: object
    fed: int = 0  # tokens already in the KV cache
    next_token: int | None = None  # sampled, not yet fed
    generated: int = 0
    text: str = ""
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class LlamaCppEngine:
    """Continuous batching over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

    Each step puts one token for every generating sequence and prompt chunks of newly admitted
    ones into a single llama_batch, decodes it once, and samples each sequence with its own
    sampler chain. A finished sequence's KV cells are freed and its slot refilled on the next step.
    """

    def __init__(self, model_path: str, n_ctx: int = 2048, parallel: int = 8, n_threads: int = 1,
                 n_batch: int = 512, flash_attn: bool = False):
        ll = self.ll = _llama()
        _quiet(ll)
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise ModelError(f"{model_path}: llama.cpp could not load this model")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.capacity, self.n_ctx, self.n_batch = parallel, n_ctx, max(n_batch, parallel)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * parallel
        cp.n_seq_max = parallel
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.kv_unified = False
        cp.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise EngineError(f"{model_path}: llama.cpp could not create a context of {cp.n_ctx} tokens")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.slots: list[_Seq | None] = [None] * parallel
        self.waiting: deque[Request] = deque()
        self.pieces: dict[int, bytes] = {}

    @classmethod
    def from_pool(cls, pool: WorkerPool, spec: JobSpec) -> "LlamaCppEngine":
        from runner.storage import fetch_to_cache

        cache = os.environ.get("RUNNER_CACHE", os.path.expanduser("~/.cache/runner/models"))
        path = fetch_to_cache(pool.model, pool.model_storage_options, cache)
        threads = pool.n_threads or max(1, int(pool.num_cpus))
        return cls(path, pool.n_ctx, pool.parallel, threads, pool.n_batch, pool.flash_attn)

    # -- the engine protocol -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request_id: int) -> None:
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        for seq in self.slots:
            if seq and seq.request.id == request_id:
                self._release(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    def step(self) -> list[Completion]:
        done = self._admit()
        fed = self._fill_batch()
        if not fed:
            return done
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} on a batch of {self.batch.n_tokens} tokens")
        for seq, index in fed:
            if index is not None:
                finished = self._sample(seq, index)
                if finished:
                    done.append(finished)
        return done

    def close(self) -> None:
        for seq in self.slots:
            if seq:
                self._release(seq)
        if self.ctx:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            self.ll.llama_model_free(self.model)
            self.ctx = self.model = None

    # -- internals -----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self.ll.llama_token * n_max)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        if n < 0:
            buf = (self.ll.llama_token * -n)()
            n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, False)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        if token not in self.pieces:
            buf = ctypes.create_string_buffer(256)
            n = self.ll.llama_token_to_piece(self.vocab, token, buf, 256, 0, False)
            self.pieces[token] = buf.raw[: max(n, 0)]
        return self.pieces[token]

    def _admit(self) -> list[Completion]:
        """Move waiting requests into free slots; rows that cannot run fail here, not in the engine."""
        failed = []
        for slot, occupant in enumerate(self.slots):
            while occupant is None and self.waiting:
                request = self.waiting.popleft()
                prompt = self.tokenize(request.prompt)
                if len(prompt) >= self.n_ctx:
                    failed.append(Completion.failed(
                        request.id, f"prompt_too_long: {len(prompt)} tokens, the context holds {self.n_ctx}",
                        len(prompt)))
                    continue
                occupant = self.slots[slot] = _Seq(request, slot, prompt, self._sampler(request.sampling))
        return failed

    def _fill_batch(self) -> list[tuple[_Seq, int | None]]:
        """One token per generating sequence, then prompt chunks up to n_batch tokens in all."""
        b, n, fed = self.batch, 0, []
        for seq in self.slots:
            if seq and not seq.prefilling:
                self._put(n, seq.next_token, seq.fed, seq.slot, True)
                seq.fed += 1
                fed.append((seq, n))
                n += 1
        for seq in self.slots:
            if seq and seq.prefilling and n < self.n_batch:
                take = min(len(seq.prompt) - seq.fed, self.n_batch - n)
                for i in range(take):
                    last = seq.fed + i == len(seq.prompt) - 1
                    self._put(n + i, seq.prompt[seq.fed + i], seq.fed + i, seq.slot, last)
                seq.fed += take
                n += take
                fed.append((seq, n - 1 if not seq.prefilling else None))
        b.n_tokens = n
        return fed

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq_id

    def _sample(self, seq: _Seq, index: int) -> Completion | None:
        token = self.ll.llama_sampler_sample(seq.sampler, self.ctx, index)
        sampling = seq.request.sampling
        if self.ll.llama_vocab_is_eog(self.vocab, token):
            return self._finish(seq, "stop")
        seq.generated += 1
        seq.text += seq.decoder.decode(self.piece(token))
        if sampling.stop and self._cut_at_stop(seq, sampling):
            return self._finish(seq, "stop")
        if seq.generated >= sampling.max_tokens or seq.fed + 1 >= self.n_ctx:
            return self._finish(seq, "length")
        seq.next_token = token
        return None

    @staticmethod
    def _cut_at_stop(seq: _Seq, sampling: Sampling) -> bool:
        window = max(len(s) for s in sampling.stop) + 16
        start = max(0, len(seq.text) - window)
        hits = [i for s in sampling.stop if (i := seq.text.find(s, start)) >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
        return bool(hits)

    def _finish(self, seq: _Seq, reason: str) -> Completion:
        if reason == "length":
            seq.text += seq.decoder.decode(b"", final=True)
        self._release(seq)
        return Completion(seq.request.id, seq.text, reason, len(seq.prompt), seq.generated)

    def _release(self, seq: _Seq) -> None:
        self.ll.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
        self.ll.llama_sampler_free(seq.sampler)
        self.slots[seq.slot] = None

    def _sampler(self, s: Sampling):
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
                self.n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
        if s.temperature == 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if s.top_k:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(s.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(s.temperature))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(s.seed))
        return chain


def _silent(level, text, user_data):  # llama.cpp logs every load to stderr otherwise
    return None


def _quiet(ll) -> None:
    if os.environ.get("RUNNER_LLAMA_LOG"):
        return
    callback = ll.llama_log_callback(_silent)
    _quiet.keep = callback  # the C side holds a pointer to it for the life of the process
    ll.llama_log_set(callback, ctypes.c_void_p(0))
