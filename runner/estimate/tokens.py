"""Each engine's prompt tokens, counted without the engine: a GGUF's vocabulary alone, a Hugging Face tokenizer
from a local directory or the Hugging Face cache, the echo engine's words."""

from __future__ import annotations

import fnmatch
import json
import os

from runner.errors import ModelError, SpecError, first_line
from runner.spec.pools import EchoPool, LlamaCppPool, PoolBase, VLLMPool, is_local_model

# What `--download-tokenizer` fetches of a Hugging Face repo, never weights: a fast tokenizer, its config and
# special tokens, a slow one's vocabulary, a chat template kept beside them, and config.json (which
# AutoTokenizer may read for the tokenizer's class, and runner plan for the context).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "*.tiktoken",
                   "chat_template.jinja", "chat_template.json", "config.json")


def open_tokens(pool: PoolBase, name: str, download_tokenizer: bool = False):
    """The pool's tokenizer, loaded without its engine: a `count(prompt)` (None for a chat row its template
    cannot render), the `context` a row must fit in, and `close()`. A vLLM pool's Hugging Face id is read from
    the local Hugging Face cache; `download_tokenizer` fetches its tokenizer and config files when missing."""
    if isinstance(pool, LlamaCppPool):
        return LlamaTokens(pool, name)
    if isinstance(pool, VLLMPool):
        return HFTokens(pool, name, download_tokenizer)
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
        from runner.engines.llamacpp.lib import llama_lib, load_model, model_chat_template
        from runner.storage.location import fetch_to_cache

        path = fetch_to_cache(pool.model, pool.model_storage_options)  # where the engine finds it too
        ll = self.ll = llama_lib()
        try:
            self.model = load_model(ll, path, pool.extra_buffers, vocab_only=True)
        except ModelError:
            raise ModelError(f"pool {name}: llama.cpp could not read the vocabulary of {pool.model}") from None
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.context, self.context_from = pool.n_ctx, "n_ctx"
        template = pool.chat_template or model_chat_template(ll, self.model)
        self.chat = ChatTemplate(template, ll, self.vocab) if template else None

    def count(self, prompt) -> int | None:
        from runner.engines.llamacpp.chat import RowError, row_tokens

        chat = isinstance(prompt, list)
        try:  # as LlamaCppEngine tokenizes the row
            tokens = row_tokens(self.ll, self.vocab, self.chat, self.add_bos, None if chat else prompt,
                                prompt if chat else None)
        except RowError:
            return None
        return len(tokens)

    def close(self) -> None:
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None


class HFTokens:
    """The vLLM pool's Hugging Face tokenizer, from a local directory or the Hugging Face cache (never weights),
    tokenizing as VLLMEngine's rows are: a prompt with special tokens, a chat row rendered by the chat template
    and then tokenized without."""

    def __init__(self, pool: VLLMPool, name: str, download: bool = False):
        args = pool.engine_args
        key = "engine_args.tokenizer" if args.get("tokenizer") else "model"
        revision = args.get("tokenizer_revision") or args.get("revision")  # vLLM's tokenizer revision
        source = model_dir(f"pool {name}: {key}", args.get("tokenizer") or pool.model, revision, "tokenizer",
                           download)
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                     trust_remote_code=bool(args.get("trust_remote_code")))
        except Exception as e:  # not a tokenizer
            raise ModelError(f"pool {name}: cannot load the tokenizer in {source} ({first_line(e, 200)})") from None
        self.chat_template = pool.chat_template
        self.context, self.context_from = _hf_context(pool, name, download)

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


def model_dir(where: str, source: str, revision: str | None, need: str, download: bool) -> str:
    """A directory on this machine holding model `source`'s `need` ("tokenizer" or "config.json"): a local
    model directory as it is, a Hugging Face id's snapshot in the local Hugging Face cache. Only with
    `download` is the hub asked, and only for the tokenizer and config files."""
    if is_local_model(source):
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise ModelError(f"{where} {source} is not a directory on this machine")
        return path
    cache = hub_cache()
    found = _cached_snapshot(where, source, revision, need, cache)
    if found is None and download:
        found = _download(where, source, revision, need, cache)
    if found is None:
        at = f" at revision {revision}" if revision else ""
        raise ModelError(f"{where} {source} is a Hugging Face id whose {need}{at} is not in the Hugging Face cache "
                         f"({cache}): cache it (`hf download {source}`) or pass --download-tokenizer to fetch "
                         "only its tokenizer and config files")
    return found


def hub_cache() -> str:
    """The Hugging Face cache as the environment names it now, as huggingface_hub (which reads it once, on
    import) and so vLLM find it: HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def _wanted(need: str) -> tuple[str, ...]:
    return TOKENIZER_FILES if need == "tokenizer" else (need,)


def _holds(path: str, need: str) -> bool:
    """Whether a snapshot holds `need`: config.json, or any tokenizer file but config.json."""
    patterns = [p for p in _wanted(need) if need != "tokenizer" or p != "config.json"]
    return any(fnmatch.fnmatch(f, p) for f in os.listdir(path) for p in patterns)


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401 - hub.errors below
    except ImportError:
        raise ModelError("runner plan reads a Hugging Face id's tokenizer with huggingface_hub, which is not "
                         "installed: pip install huggingface_hub (it comes with vllm and transformers)") from None
    return huggingface_hub


def _cached_snapshot(where: str, repo: str, revision: str | None, need: str, cache: str) -> str | None:
    """The cached snapshot of `repo` at `revision` (its refs/ name or commit) when it holds `need`, else None."""
    hub = _hub()
    try:
        path = hub.snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True,
                                     allow_patterns=list(_wanted(need)))
    except hub.errors.LocalEntryNotFoundError:  # IncompleteSnapshotError too: files of the listing missing
        return None
    except hub.errors.HFValidationError as e:
        raise ModelError(f"{where} {repo} is neither a local path (/, ./, ../ or ~) nor a Hugging Face id "
                         f"({first_line(e, 200)})") from None
    return path if _holds(path, need) else None


def _download(where: str, repo: str, revision: str | None, need: str, cache: str) -> str:
    """Fetch `need`'s files of `repo` into the Hugging Face cache (where vLLM finds them too): never weights."""
    hub = _hub()
    try:
        path = hub.snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=list(_wanted(need)))
    except Exception as e:  # offline, no such repo, a gated one, an invalid id: the hub's own words
        raise ModelError(f"{where} {repo}: cannot download its {need} files ({first_line(e, 300)})") from None
    if not _holds(path, need):
        raise ModelError(f"{where} {repo}: the hub holds no {need} for it (looked for {', '.join(_wanted(need))})")
    return path


def _hf_context(pool: VLLMPool, name: str, download: bool) -> tuple[int | None, str]:
    """The context a row must fit in: engine_args.max_model_len, else the model's config.json (its text
    model's, for a multimodal one)."""
    args = pool.engine_args
    given = args.get("max_model_len")
    if isinstance(given, int) and not isinstance(given, bool):
        return given, "engine_args.max_model_len"
    folder = model_dir(f"pool {name}: model", pool.model, args.get("revision"), "config.json", download)
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"pool {name}: cannot read {path} ({first_line(e, 200)})") from None
    ctx = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return (ctx, "config.json max_position_embeddings") if ctx else (None, "unknown: set engine_args.max_model_len")
