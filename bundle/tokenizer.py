"""The tokenizer as the service sees it: text <-> token ids, special ids, the bytes of each token.

One interface (``Tokenizer``) over two kinds of bundle tokenizer:

- ``SentencePieceTokenizer``: ``tokenizer.model`` (our own models);
- ``HuggingFaceTokenizer``: ``tokenizer.json`` read by the ``tokenizers`` library (imported
  Hugging Face checkpoints: byte-level BPE as in GPT-2, Llama-3 and Qwen, or SentencePiece-style
  BPE with byte fallback as in Llama-2 and Mistral). No torch, no ``transformers``.

Used by both the HTTP process (tokenize, detokenize, prompt rendering) and the inference worker
(detokenization of streams, end-of-sequence ids). Ids that a tokenizer does not define are -1.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

if TYPE_CHECKING:
    from bundle.format import Bundle

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_FFFD = "\ufffd"


class Tokenizer:
    """What the service needs of a tokenizer (the two kinds below implement it).

    Attributes:
        vocab_size: ids the model can produce (the width of its logits); ids the tokenizer does
            not define decode to nothing.
        bos_id, pad_id, unk_id: -1 when undefined.
        eos_id: the first end-of-sequence id; ``eos_ids`` all of them (any ends a generation).
        special_ids: ids never rendered as text (bos, eos, pad, special added tokens).
        bos_token, eos_token: their text, for chat templates (None when undefined).
    """

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    eos_ids: tuple[int, ...]
    pad_id: int
    unk_id: int
    special_ids: frozenset[int]
    bos_token: str | None
    eos_token: str | None

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        """A tokenizer file on its own: ``tokenizer.model`` (training and evaluation read this) or a
        ``tokenizer.json``, whose special ids then come from the file alone (no bos, no end ids: use
        ``from_bundle`` to serve)."""
        if Path(path).suffix == ".json":
            return HuggingFaceTokenizer.load(path, {}, 0)
        return SentencePieceTokenizer.load(path)

    @staticmethod
    def from_bundle(bundle: Bundle) -> Tokenizer:
        """The bundle's tokenizer, as its ``config.json["tokenizer"]`` describes it."""
        section = bundle.config["tokenizer"]
        if bundle.tokenizer_type == "huggingface":
            return HuggingFaceTokenizer.load(bundle.tokenizer_path, section, bundle.vocab_size)
        return SentencePieceTokenizer.load(bundle.tokenizer_path, eos_ids=bundle.eos_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos (special tokens written in the text are recognised
        by a Hugging Face tokenizer, as ``transformers`` does)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special ids are dropped, incomplete UTF-8 becomes U+FFFD."""
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """The token's own string in the vocabulary (SentencePiece '▁', GPT-2's byte alphabet...)."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text: b"" for special and undefined ids."""
        return self._bytes_table[token_id] if 0 <= token_id < len(self._bytes_table) else b""

    def token_text(self, token_id: int) -> str:
        """A token's bytes as text; a byte that is not a whole character is written as ``\\xNN``."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    @functools.cached_property
    def no_text_ids(self) -> frozenset[int]:
        """Ids with no text of their own: special, control, unknown and undefined ids."""
        return frozenset(i for i in range(self.vocab_size) if self._no_text(i))

    @functools.cached_property
    def plain_texts(self) -> dict[int, str]:
        """Text of each ordinary token when it follows other text: the detokenizer's fast path.

        Only tokens whose text does not depend on their neighbours are listed (no byte pieces, no
        token that ends inside a character); each entry is checked against ``decode`` once, so the
        table never disagrees with the tokenizer; an empty table just means no fast path.
        """
        raise NotImplementedError

    @functools.cached_property
    def _bytes_table(self) -> list[bytes]:
        raise NotImplementedError

    def _no_text(self, token_id: int) -> bool:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A thin, typed wrapper over ``sentencepiece.SentencePieceProcessor``."""

    kind = "sentencepiece"

    def __init__(self, processor: spm.SentencePieceProcessor, eos_ids: tuple[int, ...] | None = None):
        self._sp = processor
        self.vocab_size = processor.get_piece_size()
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        self.eos_ids = tuple(dict.fromkeys([self.eos_id, *(eos_ids or ())]))
        self.pad_id = processor.pad_id()
        self.unk_id = processor.unk_id()
        self.bos_token = processor.id_to_piece(self.bos_id) if self.bos_id >= 0 else None
        self.eos_token = processor.id_to_piece(self.eos_id) if self.eos_id >= 0 else None
        # Ids never rendered as text (-1 means "not defined" in SentencePiece).
        self.special_ids = frozenset(i for i in (self.bos_id, *self.eos_ids, self.pad_id) if i >= 0)

    @classmethod
    def load(cls, path: str | Path, eos_ids: tuple[int, ...] | None = None) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:  # sentencepiece raises OSError on a corrupt file
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        return cls(sp, eos_ids)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if i not in self.special_ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    @functools.cached_property
    def _bytes_table(self) -> list[bytes]:
        table = []
        for i in range(self.vocab_size):
            piece = self._sp.id_to_piece(i)
            m = _BYTE_PIECE.match(piece)
            if i in self.special_ids:
                table.append(b"")
            elif m and self._sp.is_byte(i):
                table.append(bytes([int(m.group(1), 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode())
        return table

    def _no_text(self, i: int) -> bool:
        sp = self._sp
        return i in self.special_ids or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)

    @functools.cached_property
    def plain_texts(self) -> dict[int, str]:
        # SentencePiece strips the leading '▁' of a decode, so each piece is checked after a reference.
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


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _uses_byte_level(decoder: Any) -> bool:
    """Whether a tokenizer.json decoder (or any decoder of its sequence) is ByteLevel."""
    if not isinstance(decoder, dict):
        return False
    return decoder.get("type") == "ByteLevel" or any(_uses_byte_level(d) for d in decoder.get("decoders") or ())


class HuggingFaceTokenizer(Tokenizer):
    """``tokenizer.json`` through the ``tokenizers`` library, with the ids the bundle records.

    The bundle, not the file, says whether a prompt starts with bos (``add_bos``) and which ids end
    a generation (``eos_ids``: the tokenizer's eos token and generation_config's list), as
    ``transformers`` reads them from tokenizer_config.json and generation_config.json.
    """

    kind = "huggingface"

    def __init__(self, tokenizer: Any, section: dict[str, Any], vocab_size: int, byte_level: bool):
        self._tok = tokenizer
        self._size = tokenizer.get_vocab_size(with_added_tokens=True)  # ids it defines: [0, _size)
        # the model's logits width (0: the tokenizer's own size); ids past the tokenizer decode to nothing
        self.vocab_size = vocab_size or self._size
        self._byte_level = byte_level

        def id_of(key: str) -> int:
            value = section.get(key)
            return -1 if value is None else int(value)

        self.bos_id, self.pad_id, self.unk_id = id_of("bos_id"), id_of("pad_id"), id_of("unk_id")
        self.eos_id = id_of("eos_id")
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in [self.eos_id, *(section.get("eos_ids") or ())] if i >= 0))
        self.bos_token = section.get("bos_token") or (tokenizer.id_to_token(self.bos_id) if self.bos_id >= 0 else None)
        self.eos_token = section.get("eos_token") or (tokenizer.id_to_token(self.eos_id) if self.eos_id >= 0 else None)
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        special_added = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(
            {*special_added, *self.eos_ids, *(i for i in (self.bos_id, self.pad_id) if i >= 0)}
        )

    @classmethod
    def load(cls, path: str | Path, section: dict[str, Any], vocab_size: int) -> HuggingFaceTokenizer:
        from tokenizers import Tokenizer as HFTokenizer  # only bundles with a tokenizer.json need it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text)
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # json, UTF-8 or the tokenizers library's own error type
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return cls(tok, section, vocab_size, _uses_byte_level(raw.get("decoder")))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        special = self.special_ids
        return self._tok.decode([i for i in ids if i not in special and 0 <= i < self._size],
                                skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id) if 0 <= token_id < self._size else None
        return piece if piece is not None else ""

    @functools.cached_property
    def _bytes_table(self) -> list[bytes]:
        to_latin1 = {ord(c): b for c, b in _byte_alphabet().items()}  # GPT-2's alphabet -> one char per byte
        pieces: list[str | None] = [None] * self.vocab_size
        for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
            if i < self.vocab_size:
                pieces[i] = piece
        table: list[bytes] = []
        for i, piece in enumerate(pieces):
            if i in self.special_ids or (piece is None and i not in self._added):
                table.append(b"")
            elif i in self._added:  # added tokens are literal text in every kind of tokenizer
                table.append(self._added[i].encode())
            elif self._byte_level:
                try:
                    table.append(piece.translate(to_latin1).encode("latin-1"))
                except UnicodeEncodeError:  # a character outside the byte alphabet: the piece is text
                    table.append(piece.encode())
            elif m := _BYTE_PIECE.match(piece):
                table.append(bytes([int(m.group(1), 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode())
        return table

    def _no_text(self, i: int) -> bool:
        return i in self.special_ids or i >= self._size or i == self.unk_id

    @functools.cached_property
    def plain_texts(self) -> dict[int, str]:
        # A token's text after other text is decode([ref, i]) minus decode([ref]); two references
        # must agree, and a token whose text holds U+FFFD (part of a character) is left out.
        # Byte pieces (<0xNN>) are left out: ByteFallback renders a run of them as a whole, so their
        # text depends on their neighbours.
        candidates = [i for i in range(self._size) if i not in self.special_ids and i != self.unk_id
                      and (self._byte_level or not _BYTE_PIECE.match(self._tok.id_to_token(i) or ""))]
        def whole_text(i: int) -> bool:
            text = self._tok.decode([i])
            return bool(text.strip()) and _FFFD not in text

        refs = list(itertools.islice(filter(whole_text, candidates), 2))
        if len(refs) < 2:
            return {}
        texts: list[list[str]] = []
        for ref in refs:
            ref_text = self._tok.decode([ref])
            pairs = self._tok.decode_batch([[ref, i] for i in candidates], skip_special_tokens=False)
            texts.append([p[len(ref_text):] if p.startswith(ref_text) else None for p in pairs])
        return {
            i: a for i, a, b in zip(candidates, texts[0], texts[1], strict=True)
            if a is not None and a == b and a and _FFFD not in a
        }
