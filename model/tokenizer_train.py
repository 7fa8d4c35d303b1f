"""Train the SentencePiece tokenizer (BPE, byte fallback) on the training text."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def train_tokenizer(train_txt: Path, out_model: Path, vocab_size: int, max_sentences: int = 0) -> Path:
    """Train a BPE model with byte fallback so any UTF-8 text round-trips exactly."""
    out_model.parent.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in train_txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{train_txt} is empty: nothing to train a tokenizer on")
    buf = io.BytesIO()
    print(f"training SentencePiece BPE tokenizer (vocab {vocab_size}) on {len(lines):,} lines ...", file=sys.stderr)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        # Keep whitespace faithful: the model must reproduce line structure and indentation.
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    out_model.write_bytes(buf.getvalue())
    return out_model
