"""Real Hugging Face tokenizers trained in the test process (``tokenizers`` library, no network).

- ``byte_level_bpe``: GPT-2 / Llama-3 / Qwen style, whose tokens are bytes (a token can end inside
  one character and start inside the next);
- ``byte_fallback_bpe``: Llama-2 / Mistral style, '▁' for spaces (Metaspace) and ``<0xNN>`` pieces
  for characters the vocabulary lacks.

``bundle_section`` writes ``tokenizer.json`` into a folder and returns the bundle's
``config.json["tokenizer"]`` section, as the importer writes it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]

TEXTS = [
    "hello 👋 world 日本語 café",
    "naïve résumé — ½ ∑ 🇫🇷 emoji 🤖!",
    "Ünïcödé ñ ç ß 中文字符 한국어 ok",
    "the quick brown fox\njumps over\n\nthe lazy dog",
    "🙂🙃 back to back 👍🏽 and 😀",
    "東京は日本の首都です。今日はいい天気ですね。",
]


WORDS = ("the quick brown fox jumps over a lazy dog hello world model token stream server batch "
         "café naïve résumé über straße 日本語 東京 首都 今日 天気 中文 字符 한국어 😀 👋 🤖 🙂")


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Lines mixing English, accents, CJK and emoji, so merges cross character boundaries."""
    rnd = random.Random(seed)
    words = WORDS.split()
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(n)] + TEXTS * 20


def byte_level_bpe(vocab_size: int = 600, specials: list[str] = CHATML_SPECIALS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def byte_fallback_bpe(vocab_size: int = 600, specials: list[str] = LLAMA_SPECIALS) -> Tokenizer:
    """BPE over '▁'-joined words with ``<0xNN>`` byte pieces in the vocabulary (not added tokens)."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    base.train_from_iterator(corpus(), trainer)
    model = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = {}
    for s in specials:
        vocab[s] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(specials)
    return tok


def bundle_section(tok: Tokenizer, folder: Path, *, eos: list[str], bos: str | None = None,
                   add_bos: bool = False, pad: str | None = None, unk: str | None = None) -> dict[str, Any]:
    """Write ``tokenizer.json`` into ``folder``; return the bundle's tokenizer section."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))

    def id_of(token: str | None) -> int | None:
        if token is None:
            return None
        i = tok.token_to_id(token)
        assert i is not None, token
        return i

    eos_ids = [id_of(t) for t in eos]
    return {
        "type": "huggingface", "file": "tokenizer.json", "vocab_size": tok.get_vocab_size(),
        "add_bos": add_bos, "bos_id": id_of(bos), "eos_id": eos_ids[0], "eos_ids": eos_ids,
        "pad_id": id_of(pad), "unk_id": id_of(unk), "bos_token": bos, "eos_token": eos[0],
    }
