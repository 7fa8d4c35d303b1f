"""SentencePiece tokenizer as the service sees it: text <-> token ids, special ids.

Used by both the HTTP process (tokenize, detokenize, prompt rendering) and the
inference worker (detokenization of streams). No torch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    """A thin, typed wrapper over ``sentencepiece.SentencePieceProcessor``."""

    def __init__(self, processor: spm.SentencePieceProcessor):
        self._sp = processor
        self.vocab_size: int = processor.get_piece_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.pad_id: int = processor.pad_id()
        self.unk_id: int = processor.unk_id()
        # Ids never rendered as text (-1 means "not defined" in SentencePiece).
        self.special_ids: frozenset[int] = frozenset(
            i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0
        )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:  # sentencepiece raises OSError on a corrupt file
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        return cls(sp)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special ids are dropped, incomplete UTF-8 becomes U+FFFD."""
        return self._sp.decode([i for i in ids if i not in self.special_ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    @functools.cached_property
    def plain_texts(self) -> dict[int, str]:
        """Text of each ordinary piece when it follows other text: the detokenizer's fast path.

        Byte-fallback, control and unknown pieces are left out (their text depends on their
        neighbours). Each entry is checked against ``decode`` once, after a reference piece, and
        kept only if it equals the piece with '▁' as a space, so the table never disagrees with
        the tokenizer; an empty table just means no fast path.
        """
        sp = self._sp
        ref = next((i for i in range(self.vocab_size) if self._ordinary(i) and sp.decode([i]).strip()), None)
        if ref is None:
            return {}
        ref_text = sp.decode([ref])
        table = {}
        for i in range(self.vocab_size):
            if self._ordinary(i) and i not in self.special_ids:
                text = sp.id_to_piece(i).replace("\u2581", " ")
                if sp.decode([ref, i]) == ref_text + text:
                    table[i] = text
        return table

    def _ordinary(self, i: int) -> bool:
        sp = self._sp
        return not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
