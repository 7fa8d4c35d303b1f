"""N-gram drafts for speculative greedy decoding ("prompt lookup"). Pure: no model, no I/O.

Why: at batch 1 a decode step is bound by the cost of a run, not by its arithmetic: on the
`small` model a run over 3 new positions costs about 1.2x a run over one (docs/BENCHMARKS.md).
When the next tokens repeat an earlier stretch of the sequence (speaker names, refrains, text
quoted from the prompt, code, the loops of greedy decoding), that stretch is a cheap guess of
them. The engine feeds the guess with the last token in one run and keeps every guessed token
that equals the model's own greedy choice, plus the model's token at the first miss: the output
is token for token what decoding one token per run gives, in fewer runs. (Saxena 2023, "Prompt
lookup decoding"; the n-gram speculation of vLLM and TGI.)

``NgramIndex`` keeps, for every n-gram (n = 1..max_n) of the sequence, where it last ended, so a
token costs O(max_n) dictionary operations and a proposal O(1), whatever the length.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramIndex:
    """The tokens of one sequence and the latest occurrence of each of its short n-grams.

    Args:
        tokens: the sequence so far (the prompt).
        max_n: longest suffix matched; the longest suffix that occurred before wins.
        min_n: shortest suffix matched (1: a single repeated token is enough to propose).
    """

    def __init__(self, tokens: Iterable[int] = (), max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, latest occurrence
        self._match: list[int | None] = [None] * (max_n + 1)  # n -> where the current suffix n-gram ended before
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        toks = self.tokens
        toks.append(int(token))
        i = len(toks) - 1
        for n in range(1, self.max_n + 1):
            if n > i + 1:
                self._match[n] = None
                continue
            key = tuple(toks[i - n + 1 : i + 1])
            self._match[n] = self._last_end.get(key)
            self._last_end[key] = i

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        if k < 1:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            j = self._match[n]
            if j is not None:
                return self.tokens[j + 1 : j + 1 + k]  # j < the last index: never empty
        return []
