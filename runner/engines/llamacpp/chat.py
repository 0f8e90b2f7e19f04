"""Chat rows for llama.cpp: the model's Jinja chat template rendered as Hugging Face tokenizers do."""

from __future__ import annotations

from runner.engines.llamacpp.lib import token_piece, tokenize
from runner.errors import ModelError


class RowError(Exception):
    """A row that cannot run; its message becomes the row's error."""


class ChatTemplate:
    """Renders a messages list with the model's Jinja chat template, as Hugging Face tokenizers do."""

    def __init__(self, source: str, ll, vocab):
        """`source`: the Jinja template; `ll`, `vocab`: the loaded model's library and vocabulary (its BOS and
        EOS texts go into the template's globals)."""
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.errors = TemplateError
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ModelError(f"chat template does not compile: {e}") from None
        special = {}
        for name, fn in (("bos_token", ll.llama_vocab_bos), ("eos_token", ll.llama_vocab_eos)):
            token = fn(vocab)
            special[name] = token_piece(ll, vocab, token, True).decode("utf-8", "replace") if token >= 0 else ""
        self.special = special

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except self.errors as e:
            raise RowError(f"chat_template_error: {e}") from None
        except Exception as e:  # a template is code: any failure is this row's
            raise RowError(f"chat_template_error: {type(e).__name__}: {e}") from None


def render_chat(chat: ChatTemplate, messages: list[dict], add_bos: bool) -> tuple[str, bool]:
    """A chat row's text and whether a BOS token goes before it: not when the template writes the BOS
    text itself, which would double it."""
    text = chat.render(messages)
    bos_text = chat.special["bos_token"]
    return text, add_bos and not (bos_text and text.startswith(bos_text))


def row_tokens(ll, vocab, chat: ChatTemplate | None, add_bos: bool, prompt: str | None,
               messages: list[dict] | None) -> list[int]:
    """A row's prompt tokens, as the engine feeds them: a prompt with BOS, or a chat row rendered with the
    model's template and its special tokens parsed. RowError for a chat row on a model without a template."""
    if messages is None:
        return tokenize(ll, vocab, prompt or "")
    if chat is None:
        raise RowError("no_chat_template: the model has no chat template; set chat_template in the worker pool")
    text, bos = render_chat(chat, messages, add_bos)
    return tokenize(ll, vocab, text, bos, True)


def _raise_template_error(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)
