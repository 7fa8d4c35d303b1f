"""Incremental, UTF-8-safe detokenization with stop strings (pure: a tokenizer's decode, no I/O).

Tokens arrive a few at a time; text must leave as soon as it is final, never with a half
character (U+FFFD) and never with text a stop string will cut.

Rendering uses the offset technique of HF/vLLM with a SentencePiece twist: the new tokens are
decoded behind a short *anchor* (an earlier chunk of already-emitted tokens),
``decode(anchor + new)[len(decode(anchor)):]``. SentencePiece strips the leading '▁' of the
first piece(s) of a decode, so the anchor must itself decode to non-empty text (then the new
pieces keep their spaces); at the very start there is no anchor, which reproduces the stripping
that ``decode(all)`` does. Tokens whose text ends in U+FFFD may be an unfinished character: the
last ≤ 3 of them are held back until it completes (text before them is released at once). A
byte-level BPE token (GPT-2, Llama-3, Qwen) can end inside one character and start inside another,
so several tokens in a row may have no character boundary between them: then the text before the
trailing U+FFFD (at most 3 of them, one per held byte) is released, and the tokens stay pending
until a boundary comes. Per-token work is bounded by the anchor and held tokens (at most
``_MAX_PENDING_TOKENS``), never the whole output. Fast path:
with a tokenizer that offers ``plain_texts`` (bundle.tokenizer.Tokenizer: the text of each
ordinary piece after other text, checked against ``decode``), pending tokens that are all
ordinary pieces are rendered by table lookup once an anchor exists, with no decode at all; the
anchor stays where it was (it only has to be earlier text ending on a character boundary).

Stop strings: text whose tail is a prefix of a stop string is held back; when a stop string
completes, the text before it is emitted, and it and everything after it never are.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_FFFD = "\ufffd"
_MAX_PARTIAL_TOKENS = 3  # a UTF-8 character has at most 4 bytes: at most 3 arrived while it is unfinished
_CONTEXT_TOKENS = 8  # prompt tokens kept as the first anchor
# Tokens without a character boundary between them before the text is taken as invalid UTF-8 and
# released as it decodes (real text reaches a boundary within a few tokens).
_MAX_PENDING_TOKENS = 64


class TokenizerLike(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(slots=True)
class DetokenizerUpdate:
    text_delta: str
    stop_string: str | None = None  # the stop string that matched; text_delta stops right before it


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas.

    Invariant: the deltas (and ``flush()``) concatenate to ``text``; when no stop string matched,
    ``text == tokenizer.decode(non-special output ids)``, or with ``context_ids``,
    ``decode(context + output)`` minus ``decode(context)``.

    Args:
        tokenizer: anything with ``decode(list[int]) -> str`` (SentencePiece with byte fallback).
        stop: stop strings; empty strings are ignored.
        special_ids: ids never rendered (bos, eos, pad).
        context_ids: ids that precede the output (the prompt); only its last few serve as decoding
            context, so that the first output token keeps its leading space. Never emitted.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        stop: Sequence[str] = (),
        special_ids: set[int] | frozenset[int] = frozenset(),
        context_ids: Sequence[int] = (),
    ):
        self._tokenizer = tokenizer
        self._plain: dict[int, str] = getattr(tokenizer, "plain_texts", None) or {}
        self._special = frozenset(special_ids)
        self._stops = sorted({s for s in stop if s})  # sorted, for prefix lookups by bisection
        self._stop_set = frozenset(self._stops)
        self._stop_lengths = sorted({len(s) for s in self._stops})
        context = [t for t in context_ids if t not in self._special][-_CONTEXT_TOKENS:]
        context_text = tokenizer.decode(context) if context else ""
        if context_text.endswith(_FFFD):  # the prompt ends inside a character: no usable context
            context, context_text = [], ""
        # anchor: emitted tokens that end on a character boundary and decode to non-empty text.
        self._anchor: list[int] = context if context_text else []
        self._anchor_text = context_text
        self._pending: list[int] = []  # tokens whose text is not yet rendered (or only partly)
        self._pending_done = 0  # characters of the pending tokens' text already emitted
        self._held = ""  # rendered text held back: its tail may start a stop string
        self._text = ""
        self._done = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def add(self, token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Add new output tokens; return the text that became final. Empty once stopped or flushed."""
        if self._done:
            return DetokenizerUpdate("")
        if len(token_ids) == 1 and self._anchor and not (self._pending or self._held or self._stops):
            # Most tokens: one whole-character piece after rendered text, no stop string to watch.
            # What _render and _emit would do for it, without building their intermediate lists.
            text = self._plain.get(token_ids[0])
            if text is not None and token_ids[0] not in self._special:
                self._text += text
                return DetokenizerUpdate(text)
        self._pending.extend(t for t in token_ids if t not in self._special)
        return self._emit(self._render(final=False))

    def flush(self) -> str:
        """End of the request (length, eos, abort): release everything held back."""
        if self._done:
            return ""
        update = self._emit(self._render(final=True))
        tail = "" if update.stop_string is not None else self._held
        self._held = ""
        self._text += tail
        self._done = True
        return update.text_delta + tail

    # -- rendering ----------------------------------------------------------------------------

    def _decode_after_anchor(self, ids: list[int]) -> str:
        return self._tokenizer.decode(self._anchor + ids)[len(self._anchor_text) :]

    def _render(self, final: bool) -> str:
        """Render pending tokens to text, holding back an unfinished trailing character."""
        if not self._pending:
            return ""
        done = self._pending_done  # characters of the pending tokens' text already emitted
        if self._anchor and self._plain and not done:
            plain = self._plain
            try:
                text = "".join([plain[t] for t in self._pending])
            except KeyError:  # a byte or other piece: decode
                pass
            else:
                self._pending, self._pending_done = [], 0
                return text
        text = self._decode_after_anchor(self._pending)
        if text.endswith(_FFFD) and not final:
            # Release what precedes the (at most 3) tokens of an unfinished character.
            for t in range(1, min(_MAX_PARTIAL_TOKENS, len(self._pending) - 1) + 1):
                head = self._pending[:-t]
                head_text = self._decode_after_anchor(head)
                if not head_text.endswith(_FFFD):
                    self._pending = self._pending[-t:]
                    self._pending_done = max(0, done - len(head_text))
                    self._advance(head)
                    return head_text[done:]
            if len(self._pending) > _MAX_PENDING_TOKENS:  # invalid UTF-8 all along: release it as is
                self._pending, self._pending_done = [], 0
                return text[done:]
            # No token boundary is a character boundary (byte-level BPE tokens that end inside one
            # character and start inside another): release the text before the last few U+FFFD, which
            # are the only ones more bytes can still turn into a character.
            trailing = len(text) - len(text.rstrip(_FFFD))
            stable = len(text) - min(trailing, _MAX_PARTIAL_TOKENS)
            if stable <= done:
                return ""
            self._pending_done = stable
            return text[done:stable]
        if not text and not self._anchor and not final:
            # Nothing rendered yet: these pieces (leading '▁') may still matter, since how many leading
            # spaces decode() strips depends on the model; keep a bounded run of them.
            self._pending = self._pending[-_CONTEXT_TOKENS:]
            return ""
        ids, self._pending, self._pending_done = self._pending, [], 0
        if not text.endswith(_FFFD):
            self._advance(ids)
        return text[done:]

    def _advance(self, ids: list[int]) -> None:
        """Rendered ``ids`` (ending on a character boundary) become the anchor if they decode non-empty."""
        standalone = self._tokenizer.decode(ids) if ids else ""
        if standalone:
            self._anchor, self._anchor_text = ids, standalone

    # -- stop strings -------------------------------------------------------------------------

    def _emit(self, new_text: str) -> DetokenizerUpdate:
        buf = self._held + new_text
        match = self._find_stop(buf, new_from=len(self._held)) if self._stops else None
        if match is not None:
            start, stop_string = match
            delta, self._held, self._done = buf[:start], "", True
            self._pending = []
        else:
            keep = self._partial_stop_len(buf)
            delta, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
            stop_string = None
        self._text += delta
        return DetokenizerUpdate(delta, stop_string)

    def _find_stop(self, buf: str, new_from: int) -> tuple[int, str] | None:
        """Earliest (start, stop string) in ``buf`` ending after ``new_from`` (earlier text had none)."""
        best: tuple[int, str] | None = None
        for end in range(new_from + 1, len(buf) + 1):
            for n in self._stop_lengths:
                if n > end:
                    break
                start = end - n
                if (best is None or start < best[0]) and buf[start:end] in self._stop_set:
                    best = (start, buf[start:end])
        return best

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of some stop string."""
        if not self._stops:
            return 0
        for n in range(min(len(buf), self._stop_lengths[-1] - 1), 0, -1):
            tail = buf[-n:]
            i = bisect.bisect_left(self._stops, tail)
            if i < len(self._stops) and self._stops[i].startswith(tail):
                return n
        return 0
