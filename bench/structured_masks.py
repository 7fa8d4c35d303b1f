"""How much a grammar costs per step, by vocabulary size: llguidance's compile and mask times.

    python -m bench.structured_masks --tokenizer artifacts/small/tokenizer.model --train-vocab 32000

For each SentencePiece tokenizer (a bundle's, and optionally one of ``--train-vocab`` tokens trained
here on the corpus that ``python -m model build`` prepared), it compiles bench.compare's JSON schema
(``STRUCTURED_SCHEMA``) and walks ``--rows`` constrained sequences for ``--steps`` steps, each step
computing every row's allowed tokens as the engine does (``GrammarMatchers.masks``) and then taking
a random allowed token. Prints a markdown table: compile time, mask time per row and step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.compare import STRUCTURED_SCHEMA
from bundle.tokenizer import Tokenizer
from service.engine.structured import GrammarCompiler, GrammarMatchers, Structure


def train_tokenizer(corpus: Path, vocab: int, out_dir: Path) -> Path:
    import sentencepiece as spm

    prefix = out_dir / f"bpe-{vocab}"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def measure(tokenizer: Tokenizer, rows: int, steps: int, seed: int = 0) -> dict[str, float]:
    compiler = GrammarCompiler(tokenizer)
    t0 = time.perf_counter()
    grammar = compiler.compile(Structure("json_schema", STRUCTURED_SCHEMA)).grammar
    compile_s = time.perf_counter() - t0
    cached = compiler.compile(Structure("json_schema", STRUCTURED_SCHEMA))
    matchers = GrammarMatchers(tokenizer)
    rng = np.random.default_rng(seed)
    live = [matchers.new(grammar) for _ in range(rows)]
    per_step: list[float] = []
    for _ in range(steps):
        live = [m for m in live if not m.is_stopped()] or [matchers.new(grammar) for _ in range(rows)]
        t = time.perf_counter()
        allowed = matchers.masks(live)
        per_step.append((time.perf_counter() - t) / len(live))
        for m, mask in zip(live, allowed, strict=True):
            m.consume_token(int(rng.choice(np.flatnonzero(mask))))
    return {
        "vocab": tokenizer.vocab_size,
        "compile_ms": compile_s * 1e3,
        "cached_ms": cached.compile_s * 1e3,
        "mask_us_p50": statistics.median(per_step) * 1e6,
        "mask_us_p99": float(np.percentile(per_step, 99)) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", action="append", default=[], help="a SentencePiece .model (repeatable)")
    p.add_argument("--train-vocab", type=int, action="append", default=[], help="also train one of this size")
    p.add_argument("--corpus", default=None, help="text file to train on (default: data/corpus-*/train.txt)")
    p.add_argument("--rows", type=int, default=32, help="constrained sequences per step (default: 32)")
    p.add_argument("--steps", type=int, default=200, help="steps (default: 200)")
    a = p.parse_args(argv)
    paths = [Path(t) for t in a.tokenizer]
    if a.train_vocab:
        corpus = Path(a.corpus) if a.corpus else next(Path("data").glob("corpus-*/train.txt"), None)
        if corpus is None or not corpus.is_file():
            p.error("--train-vocab needs --corpus FILE (or data/ from python -m model build)")
        tmp = Path(tempfile.mkdtemp(prefix="bench-masks-"))
        for v in a.train_vocab:
            print(f"training a {v}-token BPE on {corpus} ...", file=sys.stderr)
            paths.append(train_tokenizer(corpus, v, tmp))
    if not paths:
        p.error("give --tokenizer and/or --train-vocab")
    print("| vocabulary | schema compile (first) | cached | mask per row and step p50 | p99 |")
    print("|---|---|---|---|---|")
    for path in paths:
        r = measure(Tokenizer.load(path), a.rows, a.steps)
        print(f"| {r['vocab']:,} | {r['compile_ms']:.2f} ms | {r['cached_ms']:.3f} ms | {r['mask_us_p50']:.0f} µs "
              f"| {r['mask_us_p99']:.0f} µs |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
