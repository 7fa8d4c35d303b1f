"""Tests for service.engine.detokenizer against a tiny real SentencePiece model with byte fallback."""

from __future__ import annotations

import io
import random

import pytest
import sentencepiece as spm

from service.engine.detokenizer import IncrementalDetokenizer

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL = {PAD, BOS, EOS}

UNICODE_TEXTS = [
    "hello 👋 world 日本語 café",
    "naïve résumé — ½ ∑ 🇫🇷 emoji 🤖!",
    "Ünïcödé ñ ç ß 中文字符 한국어 ok",
    "the quick brown fox\njumps over\n\nthe lazy dog",
    "🙂🙃 back to back 👍🏽 and 😀",
]


@pytest.fixture(scope="session", params=[True, False], ids=["squeeze-spaces", "keep-spaces"])
def sp(request: pytest.FixtureRequest) -> spm.SentencePieceProcessor:
    """A tiny BPE model; decode() strips all leading '▁' (squeeze) or only the first one (keep)."""
    rnd = random.Random(0)
    text = "the quick brown fox jumps over a lazy dog hello world model token stream server batch"
    words = [*text.split(), "stop", "here", "we", "go", "text", "café", "naïve", "learning", "small", "tiny"]
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        character_coverage=1.0,
        remove_extra_whitespaces=request.param,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        unk_id=UNK,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunk: int | None = None, seed: int = 0
) -> list[str]:
    """Feed ids one at a time (or in random chunks of 1..chunk); return every delta plus the flush."""
    rnd = random.Random(seed)
    deltas: list[str] = []
    i = 0
    while i < len(ids):
        n = 1 if chunk is None else rnd.randint(1, chunk)
        update = detok.add(ids[i : i + n])
        deltas.append(update.text_delta)
        i += n
        if update.stop_string is not None:
            break
    deltas.append(detok.flush())
    for d in deltas:
        assert "\ufffd" not in d and "▁" not in d, deltas
    assert "".join(deltas) == detok.text
    return deltas


def pieces(sp: spm.SentencePieceProcessor, *names: str) -> list[int]:
    ids = [sp.piece_to_id(n) for n in names]
    assert UNK not in ids, names
    return ids


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip_one_token_at_a_time(sp: spm.SentencePieceProcessor, text: str) -> None:
    ids = sp.encode(text)
    detok = IncrementalDetokenizer(sp, special_ids=SPECIAL)
    assert "".join(stream(detok, ids)) == sp.decode(ids)


@pytest.mark.parametrize("seed", range(20))
def test_round_trip_random_text_random_chunks(sp: spm.SentencePieceProcessor, seed: int) -> None:
    rnd = random.Random(seed)
    pool = [*"abcdefg hij  klm\n", "é", "ß", "日", "本", "👋", "🤖", "  ", "🇫🇷", "ña", "\t"]
    text = "".join(rnd.choice(pool) for _ in range(rnd.randint(1, 80)))
    ids = sp.encode(text)
    ids = [i for j, t in enumerate(ids) for i in ([t, EOS] if j % 7 == 3 else [t])]  # specials in between
    detok = IncrementalDetokenizer(sp, special_ids=SPECIAL)
    assert "".join(stream(detok, ids, chunk=5, seed=seed)) == sp.decode([i for i in ids if i not in SPECIAL])


@pytest.mark.parametrize("seed", range(30))
def test_round_trip_random_piece_sequences(sp: spm.SentencePieceProcessor, seed: int) -> None:
    """Any sequence of pieces (runs of '▁', unk, specials, byte-encoded characters) streams exactly."""
    rnd = random.Random(seed)
    plain = [i for i in range(sp.get_piece_size()) if not sp.is_byte(i) and not sp.is_control(i)]
    chars = "é日本👋🤖ßñ中한\n "
    ids: list[int] = []
    for _ in range(rnd.randint(1, 60)):
        r = rnd.random()
        if r < 0.25:
            ids += [sp.piece_to_id(f"<0x{b:02X}>") for b in rnd.choice(chars).encode()]
        elif r < 0.35:
            ids.append(rnd.choice([BOS, EOS, PAD, sp.piece_to_id("▁")]))
        else:
            ids.append(rnd.choice(plain))
    context = sp.encode("a prompt") if seed % 2 else []
    detok = IncrementalDetokenizer(sp, special_ids=SPECIAL, context_ids=context)
    visible = [i for i in ids if i not in SPECIAL]
    expected = sp.decode(context + visible)[len(sp.decode(context)) :]
    assert "".join(stream(detok, ids, chunk=1 + seed % 4, seed=seed)) == expected


def test_a_character_leaves_with_its_last_byte(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode("日本")
    assert [sp.id_to_piece(i) for i in ids] == ["▁", *(f"<0x{b:02X}>" for b in "日本".encode())]
    detok = IncrementalDetokenizer(sp)
    assert [detok.add([i]).text_delta for i in ids] == ["", "", "", "日", "", "", "本"]


def test_text_before_an_unfinished_character_is_not_held(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode("hello 日")
    detok = IncrementalDetokenizer(sp)
    assert detok.add(ids[:-2]).text_delta == "hello "  # one call ends with the first byte of 日
    assert detok.add(ids[-2:-1]).text_delta == ""
    assert detok.add(ids[-1:]).text_delta == "日"


@pytest.mark.parametrize(
    "names",
    [
        ("he", "▁", "▁", "▁", "l", "l", "o"),  # spaces in the middle keep coming out
        ("▁", "▁", "he"),  # leading spaces are stripped, as decode() does
        ("<0x20>", "▁", "he"),  # a byte space is not stripped, and then neither is '▁'
        ("<0x0A>", "▁", "▁", "he"),
        ("▁",) * 20 + ("he", "▁", "▁"),  # a long run of leading spaces
        ("he", "<0xE6>", "<0x97>", "<0xA5>", "▁", "▁", "<0xF0>", "<0x9F>", "<0x91>", "<0x8B>"),
    ],
)
def test_space_pieces_match_decode(sp: spm.SentencePieceProcessor, names: tuple[str, ...]) -> None:
    ids = pieces(sp, *names)
    for chunk in (None, 3):
        detok = IncrementalDetokenizer(sp)
        assert "".join(stream(detok, ids, chunk=chunk)) == sp.decode(ids)


def test_context_ids_keep_the_first_leading_space(sp: spm.SentencePieceProcessor) -> None:
    prompt, output = sp.encode("hello"), sp.encode("world 日本")
    assert sp.decode(output) == "world 日本"  # decode alone strips the leading space
    detok = IncrementalDetokenizer(sp, special_ids=SPECIAL, context_ids=[BOS, *prompt])
    text = "".join(stream(detok, output))
    assert text == " world 日本" == sp.decode(prompt + output)[len(sp.decode(prompt)) :]


def test_flush_releases_an_unfinished_character_as_decode_renders_it(sp: spm.SentencePieceProcessor) -> None:
    ids = [*sp.encode("he"), *pieces(sp, "<0xE6>", "<0x97>")]  # cut inside 日 (max_tokens hit)
    detok = IncrementalDetokenizer(sp)
    assert "".join(detok.add([i]).text_delta for i in ids) == "he"
    assert detok.flush() == "\ufffd\ufffd"
    assert detok.text == sp.decode(ids)


def test_context_ending_inside_a_character_is_ignored(sp: spm.SentencePieceProcessor) -> None:
    context = pieces(sp, "he", "<0xE6>")
    detok = IncrementalDetokenizer(sp, context_ids=context)
    assert "".join(stream(detok, sp.encode("hello"))) == "hello"


def test_special_ids_are_not_rendered(sp: spm.SentencePieceProcessor) -> None:
    ids = [BOS, *sp.encode("hello world"), EOS, PAD]
    detok = IncrementalDetokenizer(sp, special_ids=SPECIAL)
    assert "".join(stream(detok, ids)) == "hello world"


def test_invalid_utf8_is_released_not_held_forever(sp: spm.SentencePieceProcessor) -> None:
    ids = pieces(sp, *["<0x80>"] * 10)
    detok = IncrementalDetokenizer(sp)
    deltas = [detok.add([i]).text_delta for i in ids]
    assert "".join(deltas) != ""  # released before the end of the request
    assert "".join(deltas) + detok.flush() == sp.decode(ids) == "\ufffd" * 10


def test_stop_string_spanning_tokens(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode("the quick brown fox jumps over")
    detok = IncrementalDetokenizer(sp, stop=["own fo"])
    updates = [detok.add([i]) for i in ids]
    assert [u.stop_string for u in updates if u.stop_string] == ["own fo"]
    assert "".join(u.text_delta for u in updates) == "the quick br" == detok.text
    assert detok.flush() == "" and detok.add(ids).text_delta == ""  # done


def test_stop_string_at_the_very_start(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode("the quick brown")
    detok = IncrementalDetokenizer(sp, stop=["the"])
    first = [detok.add([i]) for i in ids]
    assert "".join(u.text_delta for u in first) == ""
    assert any(u.stop_string == "the" for u in first)
    assert detok.text == ""


def test_several_stop_strings_earliest_wins(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode("the quick brown fox")
    detok = IncrementalDetokenizer(sp, stop=["fox", "brown", "quick"])
    update = detok.add(ids)  # all three complete in one step: the earliest occurrence wins
    assert (update.text_delta, update.stop_string) == ("the ", "quick")
    # Streaming: the first stop string to complete ends the text.
    detok = IncrementalDetokenizer(sp, stop=["quick brown fox", "brown"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == "the quick "


def test_flush_releases_a_held_partial_stop_match(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode("the quick brown fox")
    detok = IncrementalDetokenizer(sp, stop=["fox jumps"])
    text = "".join(detok.add([i]).text_delta for i in ids)
    assert text == "the quick brown "  # "fox" might become "fox jumps"
    assert detok.flush() == "fox"
    assert detok.text == "the quick brown fox" == sp.decode(ids)


def test_held_partial_match_released_when_it_diverges(sp: spm.SentencePieceProcessor) -> None:
    ids = sp.encode("the quick brown fox")
    detok = IncrementalDetokenizer(sp, stop=["quiet"])
    deltas = [detok.add([i]).text_delta for i in ids]
    assert "".join(deltas) == "the quick brown fox"  # "qui" was held, then released at "c"


def test_a_thousand_stop_strings(sp: spm.SentencePieceProcessor) -> None:
    rnd = random.Random(0)
    stops = [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rnd.randint(4, 30)))
        for _ in range(999)
    ]
    stops = [s for s in stops if s not in "the quick brown fox jumps over the lazy dog"] + ["lazy dog"]
    ids = sp.encode("the quick brown fox jumps over the lazy dog and more")
    detok = IncrementalDetokenizer(sp, stop=stops)
    deltas = stream(detok, ids)
    assert "".join(deltas) == "the quick brown fox jumps over the "


def test_per_token_decode_work_is_bounded(sp: spm.SentencePieceProcessor) -> None:
    class Counting:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int]) -> str:
            self.longest = max(self.longest, len(ids))
            return sp.decode(ids)

    tok = Counting()
    ids = sp.encode(" ".join(UNICODE_TEXTS) * 20)
    assert len(ids) > 1000
    context = sp.encode("a long prompt " * 50)
    detok = IncrementalDetokenizer(tok, context_ids=context)
    assert "".join(stream(detok, ids)) == sp.decode(context + ids)[len(sp.decode(context)) :]
    assert tok.longest <= 16  # a short window, never the whole output


@pytest.mark.parametrize("seed", range(6))
def test_table_fast_path_renders_exactly_what_decode_does(sp, seed):
    """bundle.tokenizer.Tokenizer offers plain_texts: the deltas must not change at all."""
    from bundle.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(sp)
    assert len(tok.plain_texts) >= 30  # the fast path is really taken for ordinary pieces

    class DecodeOnly:  # the same tokenizer without the table: the decode path
        decode = staticmethod(tok.decode)

    rnd = random.Random(seed)
    text = rnd.choice(UNICODE_TEXTS) + " the quick  brown fox " + rnd.choice(UNICODE_TEXTS)
    ids = sp.encode(text) + [rnd.randrange(sp.get_piece_size()) for _ in range(40)]
    context = sp.encode(rnd.choice(UNICODE_TEXTS))
    stops = ["fox", "🤖"] if seed % 2 else []
    fast = IncrementalDetokenizer(tok, stops, SPECIAL, context)
    slow = IncrementalDetokenizer(DecodeOnly(), stops, SPECIAL, context)
    chunks = [ids[i : i + 1 + seed % 3] for i in range(0, len(ids), 1 + seed % 3)]
    for chunk in chunks:
        a, b = fast.add(chunk), slow.add(chunk)
        assert (a.text_delta, a.stop_string) == (b.text_delta, b.stop_string)
    assert fast.flush() == slow.flush()
    assert fast.text == slow.text
