"""Each engine's prompt tokens, counted without the engine: a GGUF's vocabulary alone, a Hugging Face tokenizer
from local files, the echo engine's words."""

from __future__ import annotations

import json
import os

from runner.errors import ModelError, SpecError, first_line
from runner.spec.pools import EchoPool, LlamaCppPool, PoolBase, VLLMPool


def open_tokens(pool: PoolBase, name: str):
    """The pool's tokenizer, loaded without its engine: a `count(prompt)` (None for a chat row its template
    cannot render), the `context` a row must fit in, and `close()`."""
    if isinstance(pool, LlamaCppPool):
        return LlamaTokens(pool, name)
    if isinstance(pool, VLLMPool):
        return HFTokens(pool, name)
    if isinstance(pool, EchoPool):
        return EchoTokens()
    raise SpecError(f"pool {name}: runner plan cannot count tokens for engine {pool.engine}")


class EchoTokens:
    """The echo engine's tokens: a prompt's words (a chat row's last message's)."""

    context, context_from = None, "none: the echo engine has no context limit"

    def count(self, prompt) -> int:
        from runner.engines.echo import echo_words

        return len(echo_words(prompt))

    def close(self) -> None:
        pass


class LlamaTokens:
    """A GGUF's vocabulary and chat template alone (no weights, no context), tokenizing rows as LlamaCppEngine
    does: a prompt with BOS, a chat row rendered by runner.engines.llamacpp.chat with special tokens parsed."""

    def __init__(self, pool: LlamaCppPool, name: str):
        from runner.engines.llamacpp.chat import ChatTemplate
        from runner.engines.llamacpp.lib import llama_lib, model_chat_template, model_params, quiet_logs
        from runner.storage.location import fetch_to_cache

        cache = os.environ.get("RUNNER_CACHE", os.path.expanduser("~/.cache/runner/models"))
        path = fetch_to_cache(pool.model, pool.model_storage_options, cache)  # where the engine finds it too
        ll = self.ll = llama_lib()
        quiet_logs(ll)
        self.model = ll.llama_model_load_from_file(path.encode(), model_params(ll, pool.extra_buffers, vocab_only=True))
        if not self.model:
            raise ModelError(f"pool {name}: llama.cpp could not read the vocabulary of {pool.model}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.context, self.context_from = pool.n_ctx, "n_ctx"
        template = pool.chat_template or model_chat_template(ll, self.model)
        self.chat = ChatTemplate(template, ll, self.vocab) if template else None

    def count(self, prompt) -> int | None:
        from runner.engines.llamacpp.chat import RowError, render_chat
        from runner.engines.llamacpp.lib import tokenize

        if not isinstance(prompt, list):
            return len(tokenize(self.ll, self.vocab, prompt))
        if self.chat is None:
            return None
        try:
            text, bos = render_chat(self.chat, prompt, self.add_bos)  # as LlamaCppEngine tokenizes a chat row
        except RowError:
            return None
        return len(tokenize(self.ll, self.vocab, text, bos, True))

    def close(self) -> None:
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None


class HFTokens:
    """The vLLM pool's Hugging Face tokenizer, from local files only, tokenizing as VLLMEngine's rows are:
    a prompt with special tokens, a chat row rendered by the chat template and then tokenized without."""

    def __init__(self, pool: VLLMPool, name: str):
        args = pool.engine_args
        source = _local_dir(args.get("tokenizer") or pool.model, name)
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                     trust_remote_code=bool(args.get("trust_remote_code")))
        except Exception as e:  # not a tokenizer
            raise ModelError(f"pool {name}: cannot load the tokenizer in {source} ({first_line(e, 200)})") from None
        self.chat_template = pool.chat_template
        self.context, self.context_from = _hf_context(pool, name)

    def count(self, prompt) -> int | None:
        if not isinstance(prompt, list):
            return len(self.tok.encode(prompt))
        try:
            text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                chat_template=self.chat_template)
        except Exception:  # a template is code: whatever fails is this row's, as in the engine
            return None
        return len(self.tok.encode(text, add_special_tokens=False))

    def close(self) -> None:
        pass


def _local_dir(source: str, name: str) -> str:
    """A model directory on this machine: runner plan never asks a model hub for anything."""
    if not os.path.isdir(source):
        raise ModelError(f"pool {name}: runner plan reads the tokenizer from a local model directory, and {source} "
                         "is not one on this machine (nothing is downloaded)")
    return source


def _hf_context(pool: VLLMPool, name: str) -> tuple[int | None, str]:
    """The context a row must fit in: engine_args.max_model_len, else the model's config.json (its text
    model's, for a multimodal one)."""
    given = pool.engine_args.get("max_model_len")
    if isinstance(given, int) and not isinstance(given, bool):
        return given, "engine_args.max_model_len"
    path = os.path.join(_local_dir(pool.model, name), "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"pool {name}: cannot read {path} ({first_line(e, 200)})") from None
    ctx = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return (ctx, "config.json max_position_embeddings") if ctx else (None, "unknown: set engine_args.max_model_len")
