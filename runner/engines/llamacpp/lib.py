"""llama-cpp-python's ctypes library: loading it, model parameters (extra buffer types), tokens, quiet logs."""

from __future__ import annotations

import ctypes
import os

from runner.errors import EngineError, ModelError
from runner.hardware import cpu_flags, has_amx


def llama_lib():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the node's install
        raise EngineError("engine llamacpp needs llama-cpp-python: pip install 'runner[cpu]'") from e
    return llama_cpp


def use_extra_buffers(setting: str = "auto", flags: frozenset[str] | None = None) -> bool:
    """Whether llama.cpp may put weights in its extra CPU buffer types (the pool's `extra_buffers`).

    They hold the AMX matrix multiply and weight repacking. On a CPU with AMX (Sapphire Rapids and later),
    llama.cpp built for the machine, as llama-cpp-python builds it, takes the AMX path for quantized weights
    and crashes on the first decode (ggml-org/llama.cpp#20824): "auto" turns them off there. Elsewhere
    repacking is kept, since it speeds Q4_0 up (benchmarks/llamacpp_quants.py measures it). `flags`: the
    CPU's, read from this node when None.
    """
    if setting != "auto":
        return setting == "on"
    return not has_amx(cpu_flags() if flags is None else flags)


def load_model(ll, path: str, extra_buffers: str = "auto", vocab_only: bool = False):
    """The llama_model at `path` (its vocabulary alone with `vocab_only`), llama.cpp's logs quieted and its
    backend up; ModelError when llama.cpp cannot load it."""
    quiet_logs(ll)
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(path.encode(), model_params(ll, extra_buffers, vocab_only))
    if not model:
        raise ModelError(f"{path}: llama.cpp could not load this model")
    return model


def model_params(ll, extra_buffers: str = "auto", vocab_only: bool = False):
    """llama_model_params for every model runner loads (generation, embedding, runner plan's vocabulary)."""
    params = ll.llama_model_default_params()
    params.use_extra_bufts = use_extra_buffers(extra_buffers)
    params.vocab_only = vocab_only
    return params


def token_piece(ll, vocab, token: int, special: bool = False) -> bytes:
    """A token's bytes (a special token's own text only when `special`)."""
    buf = ctypes.create_string_buffer(256)
    n = ll.llama_token_to_piece(vocab, token, buf, 256, 0, special)
    return buf.raw[: max(n, 0)]


def model_chat_template(ll, model) -> str | None:
    """The chat template the GGUF's metadata holds, if any."""
    raw = ll.llama_model_chat_template(model, None)
    return raw.decode("utf-8", "replace") if raw else None


def tokenize(ll, vocab, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (ll.llama_token * n_max)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    if n < 0:
        buf = (ll.llama_token * -n)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, -n, add_special, parse_special)
    return list(buf[:n])


def _silent(level, text, user_data):  # llama.cpp logs every load to stderr otherwise
    return None


def quiet_logs(ll) -> None:
    if os.environ.get("RUNNER_LLAMA_LOG"):
        return
    callback = ll.llama_log_callback(_silent)
    quiet_logs.keep = callback  # the C side holds a pointer to it for the life of the process
    ll.llama_log_set(callback, ctypes.c_void_p(0))
