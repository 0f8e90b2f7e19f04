"""Sampling a llama.cpp sequence: its sampler chain, a token's log-probability, stop strings."""

from __future__ import annotations

import numpy as np

from runner.engines.base import TokenLogprob
from runner.engines.llamacpp.sequences import Seq
from runner.spec.sampling import Sampling


def sampler_chain(ll, grammars, n_vocab: int, s: Sampling, choice: int = 0):
    """The sequence's sampler chain; the chain owns (and frees) every sampler added to it, the grammar's too."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    if s.constrained:  # first, so every later sampler sees only the tokens the grammar allows
        ll.llama_sampler_chain_add(chain, grammars.sampler(s))
    if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
            n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
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
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist((s.seed + choice) & 0xFFFFFFFF))
    return chain


def token_logprob(ll, ctx, n_vocab: int, index: int, token: int, k: int, text) -> TokenLogprob:
    """The token's log-probability under the step's raw logits (before penalties, temperature or grammar),
    with the k most likely tokens, most likely first; `text(token)` names a token."""
    raw = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
    shifted = raw.astype(np.float64) - raw.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    k = min(k, n_vocab)
    top = np.argpartition(logprobs, -k)[-k:]
    top = top[np.argsort(-logprobs[top], kind="stable")]
    return TokenLogprob(text(token), float(logprobs[token]),
                        [(text(int(t)), float(logprobs[t])) for t in top])


def cut_at_stop(seq: Seq, sampling: Sampling) -> bool:
    """Cut the sequence's text at the first stop string in its tail; whether one was found."""
    window = max(len(s) for s in sampling.stop) + 16
    start = max(0, len(seq.text) - window)
    hits = [i for s in sampling.stop if (i := seq.text.find(s, start)) >= 0]
    if hits:
        seq.text = seq.text[: min(hits)]
    return bool(hits)
