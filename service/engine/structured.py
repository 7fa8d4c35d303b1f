"""Structured output: JSON schemas, regular expressions, choices and grammars, by llguidance.

Why llguidance (over xgrammar and outlines-core, measured in docs/BENCHMARKS.md "Structured
output"): it computes a token mask from a grammar with a lexer/Earley parser in Rust and needs no
precomputed per-vocabulary tables (a schema compiles in milliseconds, where outlines-core took
seconds at a 32k vocabulary), covers most of JSON Schema (and names the keywords it does not
support, which becomes our 400), takes Lark grammars (GBNF converts), and its wheel needs no
torch (xgrammar's does). The grammar engine never
runs in the sampler's arithmetic: it gives, per constrained row and step, the set of tokens that
keep the output a valid prefix; the sampler treats the others as impossible.

Two halves, one per process:

- ``GrammarCompiler`` (HTTP process): a request's structure → a validated llguidance grammar,
  cached by its text (bounded), compiled under resource limits and a time limit, so a schema we
  cannot serve is a 400 naming the problem before any engine work;
- ``GrammarMatchers`` (engine): one matcher per constrained sequence (a copy of a cached
  template), the per-step masks, and the tokens fed back.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

from bundle.tokenizer import Tokenizer

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar", "tool"]
KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar", "tool")

# JSON without optional whitespace: the same documents, fewer tokens, and a model that likes
# spaces cannot spend its max_tokens on them.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A structure we cannot serve; the message says why (it becomes a 400)."""


def parser_limits() -> llg.LLParserLimits:
    """Resource limits for compiling and for each mask: a costly grammar fails, never stalls."""
    return llg.LLParserLimits(initial_lexer_fuel=2_000_000, max_grammar_size=200_000, verbose_errors=False)


@functools.cache
def _tokenizer_for(tokenizer: Tokenizer) -> llg.LLTokenizer:
    return llg.LLTokenizer(llg.TokenizerWrapper(_TokenBytes(tokenizer)))


def llg_tokenizer(tokenizer: Tokenizer) -> llg.LLTokenizer:
    """llguidance's view of our tokenizer: every token's bytes (special tokens: none)."""
    return _tokenizer_for(tokenizer)


class _TokenBytes:
    """What ``llguidance.TokenizerWrapper`` reads: the bytes of each token, special ids, encode."""

    def __init__(self, tokenizer: Tokenizer):
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        no_text = tokenizer.no_text_ids
        self.tokens: list[bytes] = [b"" if i in no_text else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids: list[int] = sorted(no_text)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


@dataclass(frozen=True)
class Structure:
    """What a request asked for, before compilation."""

    kind: Kind
    source: Any  # a JSON schema (dict), a regex, a list of choices, a Lark/GBNF grammar

    def grammar_text(self) -> str:
        """The llguidance grammar for this structure (not yet validated)."""
        if self.kind in ("json_schema", "tool"):
            return llg.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
        if self.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            return llg.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.source))
        text = self.source
        if not is_lark_syntax(text):  # GBNF (llama.cpp's format) → Lark
            text = gbnf_to_lark(text)
        return llg.LLMatcher.grammar_from_lark(text)

    def cache_key(self) -> str:
        return self.kind + "\0" + (self.source if isinstance(self.source, str) else json.dumps(self.source, sort_keys=True))


@dataclass(frozen=True)
class Compiled:
    kind: Kind
    grammar: str
    compile_s: float  # 0 when it came from the cache
    cached: bool


class GrammarCompiler:
    """Request structures → validated grammars, cached by text, under a time limit."""

    def __init__(self, tokenizer: Tokenizer, timeout_s: float = 5.0, max_entries: int = 256,
                 max_bytes: int = 64 * 2**20):
        self.tokenizer = llg_tokenizer(tokenizer)
        self.timeout_s = timeout_s
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._bytes = 0
        self._pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="textgen-grammar")

    def compile(self, structure: Structure) -> Compiled:
        """Raises GrammarError naming the problem (bad schema, unsupported feature, too costly)."""
        key = structure.cache_key()
        grammar = self._cache.get(key)
        if grammar is not None:
            self._cache.move_to_end(key)
            return Compiled(structure.kind, grammar, 0.0, True)
        t0 = time.perf_counter()
        future = self._pool.submit(self._build, structure)
        try:
            grammar = future.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            raise GrammarError(
                f"compiling it took longer than {self.timeout_s:g} s (TEXTGEN_GRAMMAR_COMPILE_TIMEOUT_S)"
            ) from None
        elapsed = time.perf_counter() - t0
        self._remember(key, grammar)
        return Compiled(structure.kind, grammar, elapsed, False)

    def _build(self, structure: Structure) -> str:
        try:
            grammar = structure.grammar_text()
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer, limits=parser_limits()
        )
        if is_error:
            raise GrammarError(_first_line(messages[0] if messages else "invalid grammar"))
        return grammar

    def _remember(self, key: str, grammar: str) -> None:
        self._cache[key] = grammar
        self._bytes += len(key) + len(grammar)
        while self._cache and (len(self._cache) > self.max_entries or self._bytes > self.max_bytes):
            old_key, old = self._cache.popitem(last=False)
            self._bytes -= len(old_key) + len(old)


def _first_line(message: str) -> str:
    """llguidance errors carry a grammar excerpt after the first line; the reason is enough."""
    return message.strip().splitlines()[0][:500] if message.strip() else "invalid grammar"


class GrammarMatchers:
    """The engine's side: matchers per sequence, masks per step."""

    def __init__(self, tokenizer: Tokenizer, max_templates: int = 256):
        self.tokenizer = llg_tokenizer(tokenizer)
        self.vocab_size = tokenizer.vocab_size
        self._templates: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        self.max_templates = max_templates

    def new(self, grammar: str) -> llg.LLMatcher:
        """A fresh matcher for one sequence (a copy of the cached compiled grammar)."""
        template = self._templates.get(grammar)
        if template is None:
            template = llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=parser_limits())
            if template.is_error():
                raise GrammarError(_first_line(template.get_error()))
            self._templates[grammar] = template
            if len(self._templates) > self.max_templates:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(grammar)
        return template.deep_copy()

    def masks(self, matchers: list[llg.LLMatcher]) -> np.ndarray:
        """Allowed tokens of each matcher's next position: bool (n, V)."""
        bits = llg_np.allocate_token_bitmask(len(matchers), self.vocab_size)
        for row, m in enumerate(matchers):
            llg_np.fill_next_token_bitmask(m, bits, row)
        return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size].astype(bool)
