"""llama.cpp engine: one context, `parallel` sequences decoded together in one llama_batch per step."""

from __future__ import annotations

import itertools
from collections import deque

from runner.engines.base import Choice, Completion, Refused, Request
from runner.engines.llamacpp.chat import ChatTemplate, RowError, row_tokens
from runner.engines.llamacpp.grammar import GrammarError, Grammars, GrammarTextDecoder
from runner.engines.llamacpp.lib import (
    llama_lib,
    load_model,
    model_chat_template,
    token_piece,
    tokenize,
)
from runner.engines.llamacpp.sampling import cut_at_stop, sampler_chain, token_logprob
from runner.engines.llamacpp.sequences import Group, Pending, Prefix, Seq, common_prefix
from runner.errors import EngineError
from runner.spec.job import JobSpec
from runner.spec.pools import LlamaCppPool


class LlamaCppEngine:
    """Continuous batching over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

    Each step decodes the prompt chunks of newly admitted sequences, then one token for every
    generating sequence, and samples each sequence with its own sampler chain. A finished
    sequence's KV is freed and its slot refilled on the next step. A token prefix shared by queued
    prompts is computed once in a spare sequence and copied to each new one.

    A constrained row (schema, regex, choice, grammar) has llama.cpp's grammar sampler first in its chain;
    a row asking for logprobs gets them from each step's raw logits. A row with n choices takes n slots:
    its first choice's prompt KV is copied to the others when its prefill ends, and choice i samples with
    seed + i. `capacity` counts sequences, so at most `parallel` decode at once whatever the rows' n.
    For task embed, `from_pool` builds a LlamaCppEmbedder instead.
    """

    embedding_dim = 0  # a generating engine

    def __init__(self, model_path: str, n_ctx: int = 2048, parallel: int = 8, n_threads: int = 1,
                 n_batch: int = 512, flash_attn: bool = False, kv_unified: bool = False,
                 prefix_reuse: bool = True, prefix_min_tokens: int = 32, chat_template: str | None = None,
                 extra_buffers: str = "auto"):
        ll = self.ll = llama_lib()
        self.model = load_model(ll, model_path, extra_buffers)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.capacity, self.n_ctx, self.n_batch = parallel, n_ctx, max(n_batch, parallel + 1)
        # with prefix reuse one more sequence (id `parallel`) holds the shared prefix
        self.prefix_reuse, self.prefix_min = prefix_reuse, max(1, prefix_min_tokens)
        self.holder = parallel
        self.kv_unified = kv_unified
        n_seq = parallel + (1 if prefix_reuse else 0)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_seq_max = n_seq
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = 1 if flash_attn else 0
        cp.kv_unified = kv_unified
        cp.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise EngineError(f"{model_path}: llama.cpp could not create a context of {cp.n_ctx} tokens")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.slots: list[Seq | None] = [None] * parallel
        self.waiting: deque[Pending] = deque()
        self.refused = Refused()
        self.pieces: dict[int, bytes] = {}
        self.prefix: Prefix | None = None
        self.prefix_checked_for: int | None = None  # request id at the queue head when a prefix was last sought
        self.prefix_tokens_reused = 0  # prompt tokens copied from a shared prefix instead of computed
        self.prefix_tokens_computed = 0  # tokens computed for shared prefixes
        self.grammars = Grammars(ll, self.vocab)
        template = chat_template or model_chat_template(self.ll, self.model)
        self.chat = ChatTemplate(template, self.ll, self.vocab) if template else None

    @classmethod
    def from_pool(cls, pool: LlamaCppPool, spec: JobSpec):
        """The pool's engine: this one to generate, a LlamaCppEmbedder for task embed."""
        from runner.storage.location import fetch_to_cache

        path = fetch_to_cache(pool.model, pool.model_storage_options)
        if spec.task == "embed":
            from runner.engines.llamacpp.embed import LlamaCppEmbedder

            return LlamaCppEmbedder(path, pool.n_ctx, pool.parallel, pool.threads, pool.n_batch, pool.pooling,
                                    spec.embedding.normalize, pool.flash_attn, pool.extra_buffers)
        return cls(path, pool.n_ctx, pool.parallel, pool.threads, pool.n_batch, pool.flash_attn, pool.kv_unified,
                   pool.prefix_reuse, pool.prefix_min_tokens, pool.chat_template, pool.extra_buffers)

    # -- the engine protocol -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Tokenize now (so queued prompts can be searched for a shared prefix) and parse the row's grammar;
        a row that cannot run comes back failed from the next `step`."""
        try:
            tokens = self._prompt_tokens(request)
            if request.sampling.constrained:
                self.grammars.check(request.sampling)
        except (RowError, GrammarError) as e:
            self.refused.add(request.id, str(e))
            return
        if len(tokens) >= self.n_ctx:
            self.refused.too_long(request.id, len(tokens), self.n_ctx)
            return
        n = request.sampling.n
        self.waiting.append(Pending(request, tokens, 0, Group(n) if n > 1 else None))

    def abort(self, request_id: int) -> None:
        self.waiting = deque(p for p in self.waiting if p.request.id != request_id)
        self.refused.drop(request_id)
        for seq in self.slots:
            if seq and seq.request.id == request_id:
                self._release(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.refused) or any(self.slots)

    def step(self) -> list[Completion]:
        """Prompt chunks in one decode call, then one token for every generating sequence in another.

        Apart, each call splits into few and large ubatches: llama.cpp splits a batch over several
        sequences into ubatches with the same number of tokens per sequence, so a prompt chunk mixed
        with single decode tokens would be cut into slivers.
        """
        done = self._admit()
        for fill in (self._fill_prompts, self._fill_decode):
            fed = fill()
            if not self.batch.n_tokens:
                continue
            rc = self.ll.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc} on a batch of {self.batch.n_tokens} tokens")
            for seq, index in fed + self._fork(fed):
                finished = self._sample(seq, index)
                if finished:
                    done.append(finished)
        return done

    def close(self) -> None:
        for seq in self.slots:
            if seq:
                self._release(seq)
        self.prefix = None
        self.grammars.close()
        if self.ctx:
            self.ll.llama_batch_free(self.batch)
            self.ll.llama_free(self.ctx)
            self.ll.llama_model_free(self.model)
            self.ctx = self.model = None

    # -- internals -----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return tokenize(self.ll, self.vocab, text, add_special, parse_special)

    def piece(self, token: int, special: bool = False) -> bytes:
        if special:
            return self._piece(token, True)
        if token not in self.pieces:
            self.pieces[token] = self._piece(token, False)
        return self.pieces[token]

    def _piece(self, token: int, special: bool) -> bytes:
        return token_piece(self.ll, self.vocab, token, special)

    def _prompt_tokens(self, request: Request) -> list[int]:
        return row_tokens(self.ll, self.vocab, self.chat, self.add_bos, request.prompt, request.messages)

    def _admit(self) -> list[Completion]:
        """Move waiting requests into free slots; returns the rows that failed before reaching the model."""
        failed = self.refused.take()
        if not self.kv_unified:
            self._compact()
        if self.prefix_reuse and self._seek_prefix():
            return failed  # the new prefix is computed this step; requests start from it on the next
        for slot, occupant in enumerate(self.slots):
            if occupant is None and self.waiting:
                self.slots[slot] = self._start(self.waiting.popleft(), slot)
        return failed

    def _compact(self) -> None:
        """Move the sequences in the highest slots into free lower ones, so occupied slots stay 0..k-1.

        Without a unified KV buffer each sequence has a stream of its own and llama.cpp puts only
        consecutive sequence ids into one ubatch: gaps would split the decode call into several.
        The move is a stream copy (a memcpy done before the next decode) and frees the old slot.
        """
        slots = self.slots
        while True:
            free = next((i for i, s in enumerate(slots) if s is None), None)
            last = next((i for i in range(len(slots) - 1, -1, -1) if slots[i] is not None), None)
            if free is None or last is None or free > last:
                return
            seq = slots[last]
            self.ll.llama_memory_seq_cp(self.memory, last, free, -1, -1)
            self.ll.llama_memory_seq_rm(self.memory, last, -1, -1)
            seq.slot, slots[free], slots[last] = free, seq, None

    def _start(self, p: Pending, slot: int) -> Seq:
        seq = self._new_seq(p.request, p.tokens, slot, p.choice, p.group)
        if p.choice and self._copy_sibling(seq):
            return seq
        prefix = self.prefix
        if prefix and prefix.ready:
            # at least one prompt token is left to decode so the sequence has logits of its own
            reuse = min(common_prefix(prefix.tokens, p.tokens), len(p.tokens) - 1)
            if reuse >= self.prefix_min:
                self.ll.llama_memory_seq_cp(self.memory, self.holder, slot, -1, -1)
                if reuse < len(prefix.tokens):
                    self.ll.llama_memory_seq_rm(self.memory, slot, reuse, -1)
                seq.fed = seq.reused = reuse
                self.prefix_tokens_reused += reuse
        return seq

    def _new_seq(self, request: Request, prompt: list[int], slot: int, choice: int, group: Group | None) -> Seq:
        s = request.sampling
        chain = sampler_chain(self.ll, self.grammars, self.n_vocab, s, choice)
        seq = Seq(request, slot, prompt, chain, choice, group,
                  logprobs=[] if s.logprobs and choice == 0 else None)  # a row's logprobs are its first choice's
        if s.constrained:
            seq.decoder = GrammarTextDecoder()
        return seq

    def _fork(self, fed: list[tuple[Seq, int]]) -> list[tuple[Seq, int]]:
        """The further choices of each row whose first choice just ended its prefill: its KV is copied into
        free slots, and they sample from the same logits. Choices that find no free slot queue at the front."""
        forks = []
        for first, index in fed:
            group = first.group
            if group is None or first.choice or group.queued == group.n:
                continue
            free = [i for i, s in enumerate(self.slots) if s is None][: group.n - group.queued]
            for slot in free:
                self.ll.llama_memory_seq_cp(self.memory, first.slot, slot, -1, -1)
                seq = self.slots[slot] = self._new_seq(first.request, first.prompt, slot, group.queued, group)
                seq.fed = first.fed
                forks.append((seq, index))
                group.queued += 1
            for choice in range(group.n - 1, group.queued - 1, -1):
                self.waiting.appendleft(Pending(first.request, first.prompt, choice, group))
            group.queued = group.n
        return forks

    def _copy_sibling(self, seq: Seq) -> bool:
        """Start a choice from the prompt KV of another choice of its row that is past its prefill, if one is
        still running; its last prompt token is decoded again, for logits of its own."""
        sibling = next((s for s in self.slots if s and s.group is seq.group and not s.prefilling), None)
        if sibling is None:
            return False
        keep = len(seq.prompt) - 1
        self.ll.llama_memory_seq_cp(self.memory, sibling.slot, seq.slot, -1, -1)
        self.ll.llama_memory_seq_rm(self.memory, seq.slot, keep, -1)
        seq.fed = keep
        return True

    def _seek_prefix(self) -> bool:
        """Start computing a new shared prefix when the queue head shares one with the requests behind it.

        The prefix is the longest token prefix the head shares with at least half of the (up to 32)
        requests queued behind it, if that is at least `prefix_min_tokens` long and the current
        prefix does not already cover it. Returns True when a new prefix starts computing this step.
        """
        if self.prefix and not self.prefix.ready:
            return True
        if len(self.waiting) < 2 or self.waiting[0].request.id == self.prefix_checked_for or self.waiting[0].choice:
            return False  # (a further choice of a row copies its prompt from a running sibling)
        head = self.waiting[0]
        self.prefix_checked_for = head.request.id
        if self.prefix and common_prefix(self.prefix.tokens, head.tokens) >= self.prefix_min:
            return False
        others = [p.tokens for p in itertools.islice(self.waiting, 1, 33)]
        shared = sorted((common_prefix(head.tokens, t) for t in others), reverse=True)
        length = min(shared[(len(shared) - 1) // 2], len(head.tokens) - 1, self.n_ctx - 1)
        if length < self.prefix_min:
            return False
        self.ll.llama_memory_seq_rm(self.memory, self.holder, -1, -1)
        self.prefix = Prefix(head.tokens[:length])
        self.prefix_tokens_computed += length
        return True

    def _fill_prompts(self) -> list[tuple[Seq, int]]:
        """The shared prefix's next chunk, then prompt chunks in slot order, up to n_batch tokens in all.
        Returns the sequences whose prompt is complete, with the batch index of their last token."""
        n, fed = 0, []
        prefix = self.prefix
        if prefix and not prefix.ready:
            take = min(len(prefix.tokens) - prefix.fed, self.n_batch)
            for i in range(take):
                self._put(i, prefix.tokens[prefix.fed + i], prefix.fed + i, self.holder, False)
            prefix.fed += take
            n = take
        for seq in self.slots:
            if seq and seq.prefilling and n < self.n_batch:
                take = min(len(seq.prompt) - seq.fed, self.n_batch - n)
                for i in range(take):
                    last = seq.fed + i == len(seq.prompt) - 1
                    self._put(n + i, seq.prompt[seq.fed + i], seq.fed + i, seq.slot, last)
                seq.fed += take
                n += take
                if not seq.prefilling:
                    fed.append((seq, n - 1))
        self.batch.n_tokens = n
        return fed

    def _fill_decode(self) -> list[tuple[Seq, int]]:
        """The last sampled token of every generating sequence."""
        n, fed = 0, []
        for seq in self.slots:
            if seq and not seq.prefilling and seq.next_token is not None:
                self._put(n, seq.next_token, seq.fed, seq.slot, True)
                seq.fed += 1
                fed.append((seq, n))
                n += 1
        self.batch.n_tokens = n
        return fed

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq_id

    def _sample(self, seq: Seq, index: int) -> Completion | None:
        token = self.ll.llama_sampler_sample(seq.sampler, self.ctx, index)
        sampling = seq.request.sampling
        if self.ll.llama_vocab_is_eog(self.vocab, token):
            return self._finish(seq, "stop")
        if seq.logprobs is not None:
            seq.logprobs.append(token_logprob(self.ll, self.ctx, self.n_vocab, index, token, sampling.logprobs,
                                              self._token_text))
        seq.generated += 1
        seq.text += seq.decoder.decode(self.piece(token))
        if sampling.stop and cut_at_stop(seq, sampling):
            return self._finish(seq, "stop")
        if seq.generated >= sampling.max_tokens or seq.fed + 1 >= self.n_ctx:
            return self._finish(seq, "length")
        seq.next_token = token
        return None

    def _token_text(self, token: int) -> str:
        """A token's text; a control token (EOS, which has no text) by its name."""
        return (self.piece(token) or self.piece(token, special=True)).decode("utf-8", "replace")

    def _finish(self, seq: Seq, reason: str) -> Completion | None:
        if reason == "length":
            seq.text += seq.decoder.decode(b"", final=True)
        self._release(seq)
        if seq.group is not None:
            return self._finish_choice(seq, reason)
        return Completion(seq.request.id, seq.text, reason, len(seq.prompt), seq.generated, cached_tokens=seq.reused,
                          logprobs=seq.logprobs)

    @staticmethod
    def _finish_choice(seq: Seq, reason: str) -> Completion | None:
        """Record one choice; the row completes with its last choice, its own fields being the first choice's."""
        group = seq.group
        group.choices[seq.choice] = Choice(seq.text, reason, seq.generated)
        if seq.choice == 0:
            group.first = seq
        if any(c is None for c in group.choices):
            return None
        first = group.first
        return Completion(first.request.id, first.text, group.choices[0].finish_reason, len(first.prompt),
                          first.generated, cached_tokens=first.reused, logprobs=first.logprobs,
                          choices=list(group.choices))

    def _release(self, seq: Seq) -> None:
        self.ll.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
        self.ll.llama_sampler_free(seq.sampler)
        self.slots[seq.slot] = None
