"""Synthetic serving workload: request lengths, Poisson arrivals, prompts of a given token length.

Everything here is a pure function of the seed, except prompt building, which may ask the
server to count tokens through an injected ``count_tokens`` coroutine (``POST /tokenize``).

Prompt length, in order of preference:

1. ``exact``: the server can count tokens and its tokenizer is whitespace-local (the count of
   ``text + " the" * k`` is the count of ``text`` plus ``k``; checked once at start-up, true for
   SentencePiece and GPT-2 style BPE). A prefix of the passage a little shorter than the target
   is counted (one ``/tokenize`` call per prompt) and padded with the one-token word ``the``.
2. ``trimmed``: the server can count tokens but the check failed: the prefix is cut to at most
   the target from the measured tokens-per-word ratio; the count is close, not exact.
3. ``words``: no ``/tokenize``: ``WORDS_PER_TOKEN`` words per wanted token.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

# Public-domain English: Shakespeare (sonnets 18, 29, 73, 116, 130; Hamlet, Macbeth and
# Twelfth Night) and Lincoln's Gettysburg Address. Prompts are windows of it, cycled.
PASSAGE = """
Shall I compare thee to a summer's day? Thou art more lovely and more temperate: Rough winds do
shake the darling buds of May, And summer's lease hath all too short a date; Sometime too hot the
eye of heaven shines, And often is his gold complexion dimm'd; And every fair from fair sometime
declines, By chance or nature's changing course untrimm'd; But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st; Nor shall Death brag thou wander'st in his shade, When
in eternal lines to time thou grow'st: So long as men can breathe or eyes can see, So long lives
this, and this gives life to thee.
When, in disgrace with fortune and men's eyes, I all alone beweep my outcast state, And trouble deaf
heaven with my bootless cries, And look upon myself and curse my fate, Wishing me like to one more
rich in hope, Featured like him, like him with friends possess'd, Desiring this man's art and that
man's scope, With what I most enjoy contented least; Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state, Like to the lark at break of day arising From sullen earth,
sings hymns at heaven's gate; For thy sweet love remember'd such wealth brings That then I scorn to
change my state with kings.
That time of year thou mayst in me behold When yellow leaves, or none, or few, do hang Upon those
boughs which shake against the cold, Bare ruin'd choirs, where late the sweet birds sang. In me thou
see'st the twilight of such day As after sunset fadeth in the west, Which by and by black night doth
take away, Death's second self, that seals up all in rest. In me thou see'st the glowing of such fire
That on the ashes of his youth doth lie, As the death-bed whereon it must expire, Consumed with that
which it was nourish'd by. This thou perceivest, which makes thy love more strong, To love that well
which thou must leave ere long.
Let me not to the marriage of true minds Admit impediments. Love is not love Which alters when it
alteration finds, Or bends with the remover to remove: O no! it is an ever-fixed mark That looks on
tempests and is never shaken; It is the star to every wandering bark, Whose worth's unknown,
although his height be taken. Love's not Time's fool, though rosy lips and cheeks Within his bending
sickle's compass come: Love alters not with his brief hours and weeks, But bears it out even to the
edge of doom. If this be error and upon me proved, I never writ, nor no man ever loved.
My mistress' eyes are nothing like the sun; Coral is far more red than her lips' red; If snow be
white, why then her breasts are dun; If hairs be wires, black wires grow on her head. I have seen
roses damask'd, red and white, But no such roses see I in her cheeks; And in some perfumes is there
more delight Than in the breath that from my mistress reeks. I love to hear her speak, yet well I
know That music hath a far more pleasing sound; I grant I never saw a goddess go; My mistress, when
she walks, treads on the ground: And yet, by heaven, I think my love as rare As any she belied with
false compare.
To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer The slings and
arrows of outrageous fortune, Or to take arms against a sea of troubles, And by opposing end them.
To die, to sleep, No more; and by a sleep to say we end The heart-ache and the thousand natural
shocks That flesh is heir to: 'tis a consummation Devoutly to be wish'd. To die, to sleep; To sleep,
perchance to dream: ay, there's the rub; For in that sleep of death what dreams may come, When we
have shuffled off this mortal coil, Must give us pause: there's the respect That makes calamity of
so long life; For who would bear the whips and scorns of time, The oppressor's wrong, the proud man's
contumely, The pangs of despised love, the law's delay, The insolence of office and the spurns That
patient merit of the unworthy takes, When he himself might his quietus make With a bare bodkin? who
would fardels bear, To grunt and sweat under a weary life, But that the dread of something after
death, The undiscover'd country from whose bourn No traveller returns, puzzles the will And makes us
rather bear those ills we have Than fly to others that we know not of? Thus conscience does make
cowards of us all; And thus the native hue of resolution Is sicklied o'er with the pale cast of
thought, And enterprises of great pith and moment With this regard their currents turn awry, And
lose the name of action.
To-morrow, and to-morrow, and to-morrow, Creeps in this petty pace from day to day To the last
syllable of recorded time, And all our yesterdays have lighted fools The way to dusty death. Out,
out, brief candle! Life's but a walking shadow, a poor player That struts and frets his hour upon
the stage And then is heard no more: it is a tale Told by an idiot, full of sound and fury,
Signifying nothing.
If music be the food of love, play on; Give me excess of it, that, surfeiting, The appetite may
sicken, and so die. That strain again! it had a dying fall: O, it came o'er my ear like the sweet
sound, That breathes upon a bank of violets, Stealing and giving odour! Enough; no more: 'Tis not so
sweet now as it was before. O spirit of love! how quick and fresh art thou, That, notwithstanding
thy capacity Receiveth as the sea, nought enters there, Of what validity and pitch soe'er, But falls
into abatement and low price, Even in a minute: so full of shapes is fancy That it alone is high
fantastical.
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived
in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in
a great civil war, testing whether that nation, or any nation so conceived and so dedicated, can
long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of
that field, as a final resting place for those who here gave their lives that that nation might
live. It is altogether fitting and proper that we should do this. But, in a larger sense, we can
not dedicate, we can not consecrate, we can not hallow this ground. The brave men, living and dead,
who struggled here, have consecrated it, far above our poor power to add or detract. The world will
little note, nor long remember what we say here, but it can never forget what they did here. It is
for us the living, rather, to be dedicated here to the unfinished work which they who fought here
have thus far so nobly advanced. It is rather for us to be here dedicated to the great task
remaining before us, that from these honored dead we take increased devotion to that cause for
which they gave the last full measure of devotion, that we here highly resolve that these dead
shall not have died in vain, that this nation, under God, shall have a new birth of freedom, and
that government of the people, by the people, for the people, shall not perish from the earth.
"""
WORDS = tuple(PASSAGE.split())
FILLER_WORD = "the"  # one token in any English BPE/unigram vocabulary; checked at start-up
WORDS_PER_TOKEN = 0.75  # the usual rule of thumb for English, used without /tokenize

PromptMode = Literal["exact", "trimmed", "words"]
TokenCounter = Callable[[str], Awaitable[int]]


def parse_range(text: str, name: str) -> tuple[int, int]:
    """Parse ``"MIN:MAX"`` or ``"N"`` (meaning ``N:N``) into a pair of positive integers.

    Raises:
        ValueError: naming ``name`` and quoting ``text`` when malformed.
    """
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        raise ValueError(f"{name} must be MIN:MAX or N with integers, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of the workload, before its prompt text exists."""

    index: int
    prompt_len: int  # wanted prompt tokens
    output_len: int  # max_tokens (with ignore_eos, the exact output length)
    offset: int  # where in WORDS the prompt window starts


def sample_requests(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
) -> list[RequestSpec]:
    """Draw ``n`` requests with uniform prompt and output lengths (inclusive bounds)."""
    rng = np.random.default_rng([seed, 0])
    prompt = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    output = rng.integers(output_range[0], output_range[1] + 1, size=n)
    offset = rng.integers(0, len(WORDS), size=n)
    return [RequestSpec(i, int(prompt[i]), int(output[i]), int(offset[i])) for i in range(n)]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process of ``rate`` requests/s.

    Inter-arrival gaps are exponential with mean ``1 / rate``, drawn from a stream of the seed
    separate from the lengths, so changing the rate does not change the requests. An infinite
    rate sends everything at time 0.
    """
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps).tolist()


def window(offset: int, n_words: int) -> str:
    """``n_words`` words of the passage from ``offset``, wrapping around."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


@dataclass(frozen=True, slots=True)
class PromptPlan:
    """How prompts are sized, decided once per run by ``plan_prompts``."""

    mode: PromptMode
    tokens_per_word: float


async def plan_prompts(count_tokens: TokenCounter | None) -> PromptPlan:
    """Measure the tokenizer (two ``/tokenize`` calls) and pick a prompt mode."""
    if count_tokens is None:
        return PromptPlan("words", 1.0 / WORDS_PER_TOKEN)
    passage = " ".join(WORDS)
    base = await count_tokens(passage)
    padded = await count_tokens(passage + f" {FILLER_WORD}" * 7)
    mode: PromptMode = "exact" if padded - base == 7 else "trimmed"
    return PromptPlan(mode, max(base, 1) / len(WORDS))


async def build_prompt(
    spec: RequestSpec, plan: PromptPlan, count_tokens: TokenCounter | None
) -> tuple[str, int | None]:
    """Text of about ``spec.prompt_len`` tokens, and its token count when it was measured.

    In ``exact`` mode the count equals ``spec.prompt_len`` unless the target is smaller than
    the first word of the window (then the text is that word, and the count says so).
    """
    target = spec.prompt_len
    if plan.mode == "words" or count_tokens is None:
        return window(spec.offset, max(1, round(target / plan.tokens_per_word))), None
    # Aim a few tokens short so that the padding only ever adds.
    margin = max(1, math.ceil(0.03 * target))
    n_words = max(1, math.floor((target - margin) / plan.tokens_per_word))
    text = window(spec.offset, n_words)
    count = await count_tokens(text)
    while count > target and n_words > 1:  # rare: a window denser than the passage
        n_words = max(1, min(n_words - 1, math.floor(n_words * target / count) - 1))
        text = window(spec.offset, n_words)
        count = await count_tokens(text)
    if plan.mode == "exact" and count < target:
        text += f" {FILLER_WORD}" * (target - count)
        count = target
    return text, count
