"""Constrained decoding for llama.cpp: each constraint as a GBNF grammar, parsed once and cloned per sequence."""

from __future__ import annotations

import json
from collections import OrderedDict

from runner.spec.sampling import Sampling

# Escapes a GBNF literal needs; other control characters are written as \xHH.
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A JSON string's characters. llama-cpp-python's converter allows raw control characters (json.loads does not).
# Listed, not negated: llama.cpp decodes byte tokens leniently, and would take invalid UTF-8 (a code point above
# U+10FFFF, a surrogate) as one character, which the text can only show as U+FFFD.
_JSON_CHAR = (r'[\x20-\x21\x23-\x5B\x5D-\x7E\u0080-\uD7FF\uE000-\uFFFF\U00010000-\U0010FFFF]'
              r' | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])')
_CLASS_SHORTHANDS = {"d": "0-9", "w": "a-zA-Z0-9_", "s": "\\x20\\t\\n\\r\\x0C\\x0B"}
_NAMED = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
_HEX = {"x": 2, "u": 4, "U": 8}


class GrammarError(ValueError):
    """A constraint that cannot become a grammar llama.cpp parses; the message is the row's error."""


def literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    out = "".join(_LITERAL_ESCAPES.get(c) or (f"\\x{ord(c):02X}" if ord(c) < 0x20 else c) for c in text)
    return f'"{out}"'


def gbnf(sampling: Sampling) -> str:
    """The GBNF grammar (root rule `root`) for the row's constraint: a JSON schema (json_object is any JSON
    object), a regex (the whole text must match), a choice of literal strings, or the grammar as given."""
    if sampling.grammar is not None:
        return sampling.grammar
    if sampling.choice is not None:
        return "root ::= " + " | ".join(literal(c) for c in sampling.choice)
    if sampling.regex is not None:
        return regex_gbnf(sampling.regex)
    schema = sampling.json_schema
    if schema is None:
        raise GrammarError("bad_grammar: the row has no constraint")
    return schema_gbnf(schema)


def schema_gbnf(schema: dict) -> str:
    """A JSON schema's grammar, by llama-cpp-python's converter with strict JSON strings. Keywords it does not
    enforce (minimum, maximum, multipleOf, ...) are checked after decoding, by runner.structured.check."""
    converter = _converter()
    try:
        converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "input"), "")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise GrammarError(f"bad_grammar: the JSON schema has no grammar ({type(e).__name__}: {e})") from None
    return converter.format_grammar()


def regex_gbnf(pattern: str) -> str:
    """A regex's grammar, unquoted: the converter writes a JSON string's pattern, quotes included; those are cut off."""
    converter = _converter()
    try:
        name = converter._visit_pattern(pattern, "root")
    except (AssertionError, ValueError, IndexError) as e:
        raise GrammarError(f"bad_grammar: regex {pattern!r} has no grammar ({e})") from None
    quoted = converter._rules[name]
    converter._rules[name] = quoted.removeprefix('"\\"" ').removesuffix(' "\\"" space')
    return converter.format_grammar()


def _regex_subset(pattern: str) -> str:
    """The same regex in the subset the converter reads: no anchors, (?: groups or lazy quantifiers, and every
    escape as a one-character class of \\xHH (the converter copies escapes into GBNF, which knows few of them,
    and would split an escaped literal from its quantifier)."""
    pattern = pattern.removeprefix("^")
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    out, i, in_class, quantified = [], 0, False, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            chars, i = _escape(pattern, i + 1)
            out.append(chars if in_class else f"[{chars}]")
        elif c == "(" and pattern.startswith("(?:", i):
            out.append("(")
            i += 3
        elif c == "?" and quantified and not in_class:
            i += 1  # lazy and greedy match the same whole texts
        else:
            in_class = (in_class and c != "]") or (not in_class and c == "[")
            out.append(c)
            i += 1
        quantified = not in_class and out[-1][-1:] in ("*", "+", "?", "}") and c != "\\"
    return "".join(out)


def _escape(pattern: str, i: int) -> tuple[str, int]:
    """The escape at pattern[i] (after its backslash) as the inside of a GBNF character class, and where it ends."""
    c = pattern[i]
    if c in _CLASS_SHORTHANDS:
        return _CLASS_SHORTHANDS[c], i + 1
    if c in _HEX:
        digits = pattern[i + 1: i + 1 + _HEX[c]]
        if len(digits) != _HEX[c] or not all(d in "0123456789abcdefABCDEF" for d in digits):
            raise GrammarError(f"bad_grammar: regex: incomplete escape \\{c}{digits}")
        return _class_char(chr(int(digits, 16))), i + 1 + _HEX[c]
    if c in _NAMED:
        return _class_char(_NAMED[c]), i + 1
    if c.isalnum():
        raise GrammarError(f"bad_grammar: regex: \\{c} is not supported in constrained decoding")
    return _class_char(c), i + 1


def _class_char(c: str) -> str:
    if c.isalnum():
        return c
    code = ord(c)
    return f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def _converter():
    from llama_cpp.llama_grammar import SchemaConverter

    class StrictConverter(SchemaConverter):
        """llama-cpp-python's converter, with JSON's own string characters, backslashes kept literal, and
        patterns read through _regex_subset."""

        def _format_literal(self, text):
            return literal(text)

        def _visit_pattern(self, pattern, name):
            # anchored: a schema's pattern may match anywhere, so a text matching it whole also follows the schema
            return super()._visit_pattern("^" + _regex_subset(pattern) + "$", name)

        def _add_primitive(self, name, rule):
            key = super()._add_primitive(name, rule)
            if "char" in self._rules:
                self._rules["char"] = _JSON_CHAR
            return key

    return StrictConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


class GrammarTextDecoder:
    """Decodes a constrained row's bytes as llama.cpp's grammar reads them, so the text has the characters the
    grammar counted. The grammar takes an overlong UTF-8 sequence (E0 84 B8) as the character it spells (U+0138)
    where Python would write three U+FFFD, which would break a maxLength or a `{n}` the grammar kept."""

    def __init__(self):
        self.value, self.remain = 0, 0

    def decode(self, data: bytes, final: bool = False) -> str:
        out = []
        for byte in data:
            if self.remain and byte >> 6 == 2:
                self.value, self.remain = (self.value << 6) | (byte & 0x3F), self.remain - 1
                if not self.remain:
                    out.append(_char(self.value))
                continue
            if self.remain:  # a sequence cut short (the grammar never lets one through)
                out.append("\ufffd")
            length = _UTF8_LENGTH[byte >> 4]
            self.value, self.remain = byte & ((1 << (8 - length)) - 1), length - 1  # llama.cpp's masks
            if length == 1:
                out.append(chr(byte))
            elif not length:
                out.append("\ufffd")
                self.remain = 0
        if final and self.remain:
            out.append("\ufffd")
            self.remain = 0
        return "".join(out)


_UTF8_LENGTH = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4)  # by the high 4 bits of a sequence's first byte


def _char(code: int) -> str:
    return "\ufffd" if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF else chr(code)


class Grammars:
    """Grammar samplers for constrained rows: each distinct constraint is turned into GBNF and parsed once
    (a bounded cache); every sequence gets its own clone, so batched rows keep their own grammar state."""

    def __init__(self, ll, vocab, size: int = 256):
        self.ll, self.vocab, self.size = ll, vocab, size
        self.cache: OrderedDict[str, object] = OrderedDict()  # key -> parsed sampler, or the error's message

    def check(self, sampling: Sampling) -> None:
        """Raise GrammarError when the row's constraint has no grammar llama.cpp accepts."""
        self._parsed(sampling)

    def sampler(self, sampling: Sampling):
        """A fresh grammar sampler for one sequence; the sampler chain it is added to owns (and frees) it."""
        return self.ll.llama_sampler_clone(self._parsed(sampling))

    def close(self) -> None:
        for entry in self.cache.values():
            if not isinstance(entry, str):
                self.ll.llama_sampler_free(entry)
        self.cache.clear()

    def _parsed(self, sampling: Sampling):
        key = _key(sampling)
        entry = self.cache.get(key)
        if entry is None:
            entry = self._parse(sampling)
            self.cache[key] = entry
            if len(self.cache) > self.size:
                _, old = self.cache.popitem(last=False)
                if not isinstance(old, str):
                    self.ll.llama_sampler_free(old)
        self.cache.move_to_end(key)
        if isinstance(entry, str):
            raise GrammarError(entry)
        return entry

    def _parse(self, sampling: Sampling):
        try:
            text = gbnf(sampling)
        except GrammarError as e:
            return str(e)
        parsed = self.ll.llama_sampler_init_grammar(self.vocab, text.encode("utf-8"), b"root")
        # llama.cpp prints the parse error to stderr and returns NULL (also for left recursion)
        return parsed or "bad_grammar: llama.cpp could not parse the grammar (it needs a `root` rule)"


def _key(s: Sampling) -> str:
    return json.dumps([s.grammar, s.choice, s.regex, s.json_schema], sort_keys=True)
