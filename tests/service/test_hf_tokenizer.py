"""bundle.tokenizer.HuggingFaceTokenizer and the detokenizer over real byte-level and byte-fallback
BPE tokenizers trained in the test (tests/hf_tokenizers.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hf_tokenizers import TEXTS, bundle_section, byte_fallback_bpe, byte_level_bpe

from bundle.tokenizer import HuggingFaceTokenizer
from service.engine.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module", params=["byte-level", "byte-fallback"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HuggingFaceTokenizer:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "byte-level":
        section = bundle_section(byte_level_bpe(), folder, eos=["<|im_end|>", "<|endoftext|>"])
    else:
        section = bundle_section(byte_fallback_bpe(), folder, eos=["</s>"], bos="<s>", add_bos=True, unk="<unk>")
    return HuggingFaceTokenizer.load(folder / "tokenizer.json", section, section["vocab_size"])


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> HuggingFaceTokenizer:
    folder = tmp_path_factory.mktemp("bl")
    section = bundle_section(byte_level_bpe(), folder, eos=["<|im_end|>", "<|endoftext|>"])
    return HuggingFaceTokenizer.load(folder / "tokenizer.json", section, section["vocab_size"])


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    deltas, i = [], 0
    while i < len(ids):
        n = rnd.randint(1, chunk)
        deltas.append(detok.add(ids[i : i + n]).text_delta)
        i += n
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok: HuggingFaceTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_text(tok: HuggingFaceTokenizer, text: str) -> None:
    """What logprobs and structured output read: each token's bytes, joined, are the text's bytes
    (the byte-fallback tokenizer writes a leading '▁' that decode strips)."""
    joined = b"".join(tok.token_bytes(i) for i in tok.encode(text))
    assert joined == (text.encode() if tok._byte_level else b" " + text.encode())


def test_special_tokens_in_text_are_recognised_and_never_rendered(byte_level: HuggingFaceTokenizer) -> None:
    im_start, im_end = byte_level.encode("<|im_start|>")[0], byte_level.encode("<|im_end|>")[0]
    ids = byte_level.encode("<|im_start|>user\nhi 😀<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end  # one id each, as transformers tokenizes a chat prompt
    assert byte_level.decode(ids) == "user\nhi 😀"
    assert {im_start, im_end} <= byte_level.special_ids
    assert byte_level.token_bytes(im_end) == b"" and im_end in byte_level.no_text_ids


def test_bundle_ids(byte_level: HuggingFaceTokenizer, tok: HuggingFaceTokenizer) -> None:
    assert byte_level.eos_ids == (byte_level.encode("<|im_end|>")[0], byte_level.encode("<|endoftext|>")[0])
    assert byte_level.eos_id == byte_level.eos_ids[0] and byte_level.bos_id == -1 and byte_level.eos_token == "<|im_end|>"
    if tok.bos_id >= 0:  # byte fallback: Llama-style bos
        assert tok.bos_token == "<s>" and tok.id_to_piece(tok.bos_id) == "<s>"


def test_ids_beyond_the_tokenizer_decode_to_nothing(tmp_path: Path) -> None:
    """A model's vocabulary can be padded past the tokenizer's (Qwen2: 151,936 vs 151,665)."""
    section = bundle_section(byte_level_bpe(), tmp_path, eos=["<|endoftext|>"])
    size = section["vocab_size"]
    tok = HuggingFaceTokenizer.load(tmp_path / "tokenizer.json", section, size + 64)
    assert tok.vocab_size == size + 64
    hi = tok.encode("hi")
    assert tok.decode([*hi, size + 5, *hi]) == "hihi"
    assert tok.token_bytes(size + 5) == b"" and size + 5 in tok.no_text_ids and size + 5 not in tok.plain_texts


def test_plain_texts_agree_with_decode(tok: HuggingFaceTokenizer) -> None:
    table = tok.plain_texts
    assert len(table) > 100
    ref = tok.encode("hello")
    for i, text in list(table.items())[::7]:
        assert tok.decode([*ref, i]) == tok.decode(ref) + text
        assert FFFD not in text


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_final_text_and_never_shows_a_replacement_character(
    tok: HuggingFaceTokenizer, text: str, chunk: int
) -> None:
    prompt = tok.encode("User: say it ")
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, special_ids=tok.special_ids, context_ids=prompt)
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert all(FFFD not in d for d in deltas), deltas


class ByteChunks:
    """Tokens that are arbitrary byte strings, decoded as byte-level BPE decodes (lossy UTF-8)."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", errors="replace")


def check_prompt_release(tok, ids: list[int], text: str) -> None:
    """The stream never shows U+FFFD, equals ``text``, and releases whole characters within three
    tokens (one per byte of an unfinished character), whatever the token boundaries."""
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    for k, t in enumerate(ids, 1):
        delta = detok.add([t]).text_delta
        assert FFFD not in delta
        emitted += delta
        whole = tok.decode(ids[: max(0, k - 3)]).rstrip(FFFD)
        assert text.startswith(emitted) and len(emitted) >= len(whole), (k, emitted, whole)
    assert emitted + detok.flush() == text


@pytest.mark.parametrize("seed", range(10))
def test_tokens_without_character_boundaries_between_them(seed: int) -> None:
    """Byte-level tokens can end inside one character and start inside the next, many in a row."""
    rnd = random.Random(seed)
    data = "".join(TEXTS).encode()
    chunks, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 6)
        chunks.append(data[i : i + n])
        i += n
    check_prompt_release(ByteChunks(chunks), list(range(len(chunks))), data.decode())


def test_real_tokens_that_straddle_characters(byte_level: HuggingFaceTokenizer) -> None:
    """The trained tokenizer's own cross-character tokens (e.g. the end of 東 + 京), as a model may
    emit them: byte tokens up to each, then the token."""
    vocab = {byte_level.token_bytes(i): i for i in range(byte_level.vocab_size) if byte_level.token_bytes(i)}
    straddling = sorted((b for b in vocab if len(b) > 1 and (b[0] & 0xC0) == 0x80), key=len, reverse=True)
    assert straddling, "the test needs tokens that are parts of characters"
    text = "".join(TEXTS) * 2
    data, ids, i, used = text.encode(), [], 0, 0
    while i < len(data):
        b = next((s for s in straddling if data.startswith(s, i)), None)
        if b is None:
            ids.append(vocab[data[i : i + 1]])
            i += 1
        else:
            ids.append(vocab[b])
            i, used = i + len(b), used + 1
    assert used >= 5
    assert byte_level.decode(ids) == text
    check_prompt_release(byte_level, ids, text)


@pytest.mark.parametrize("seed", range(8))
def test_random_tokens_stream_as_they_decode(tok: HuggingFaceTokenizer, seed: int) -> None:
    """Any token sequence (a random model's output): the table fast path changes no delta, and the
    stream is the final text, U+FFFD included only where the final text has it. (Exception: the
    ByteFallback decoder renders a run of byte pieces that is not valid UTF-8 as one U+FFFD per
    piece, ASCII bytes included, so a later invalid byte can change text already streamed; valid
    text, as above, streams exactly.)"""
    rnd = random.Random(seed)
    ids = tok.encode(rnd.choice(TEXTS)) + [rnd.randrange(tok.vocab_size) for _ in range(60)]
    context = tok.encode(rnd.choice(TEXTS))

    class DecodeOnly:  # the same tokenizer without the table: the decode path
        decode = staticmethod(tok.decode)

    fast = IncrementalDetokenizer(tok, (), tok.special_ids, context)
    slow = IncrementalDetokenizer(DecodeOnly(), (), tok.special_ids, context)
    for i in range(0, len(ids), 1 + seed % 3):
        chunk = ids[i : i + 1 + seed % 3]
        assert fast.add(chunk).text_delta == slow.add(chunk).text_delta
    assert fast.flush() == slow.flush()
    expected = tok.decode(context + ids)[len(tok.decode(context)):]
    if tok._byte_level or FFFD not in expected:
        assert fast.text == expected


def test_structured_output_reads_the_token_bytes(tok: HuggingFaceTokenizer) -> None:
    """llguidance builds its token table from token_bytes: a regex allows exactly the tokens whose
    text keeps the output a match (digits here), never a special or undefined id."""
    from service.engine.structured import GrammarMatchers, Structure

    matchers = GrammarMatchers(tok)
    m = matchers.new(Structure("regex", "[0-9]+").grammar_text())
    allowed = set(matchers.masks([m])[0].nonzero()[0].tolist())
    digits = {i for i in range(tok.vocab_size) if tok.token_bytes(i).isdigit()}
    assert digits and digits <= allowed
    assert all(tok.token_bytes(i).isdigit() for i in allowed if i not in tok.no_text_ids)
    assert not allowed & tok.special_ids


def test_a_tokenizer_json_alone_encodes_and_decodes(tmp_path: Path) -> None:
    """Tokenizer.load reads either file kind (benchmarks tokenize text with it); ids come from a bundle."""
    from bundle.tokenizer import Tokenizer

    bundle_section(byte_level_bpe(), tmp_path, eos=["<|endoftext|>"])
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.kind == "huggingface" and tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]
    assert tok.eos_ids == () and tok.bos_id == -1
