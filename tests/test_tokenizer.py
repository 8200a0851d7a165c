"""Tokenizer round trips and errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxgpt.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TRAIN_TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "私は学校へ行く 😀🎉 " * 5]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(TRAIN_TEXT, vocab_size=300)


def test_char_round_trip_and_vocabulary():
    tok = Tokenizer.train_char(["hello, world\n"])
    assert tok.kind == "char" and tok.vocab_size == len(set("hello, world\n"))
    ids = tok.encode("low, hello\n")
    assert len(ids) == len("low, hello\n")
    assert tok.decode(ids) == "low, hello\n"


def test_char_rejects_unknown_characters_with_a_clear_message():
    tok = Tokenizer.train_char(["abc"])
    with pytest.raises(TokenizerError, match=r"not in this model's character vocabulary: 'z'"):
        tok.encode("abz")


@pytest.mark.parametrize(
    "text", ["「私は学校へ行く」", "emoji 😀👍🏽 and 🇯🇵", "", "\x00\t\r\n", "mixed Ünïcödé ∑ 𝔘"]
)
def test_bpe_round_trips_any_utf8(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trips_arbitrary_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_has_a_start_token(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 300
    assert len(bpe.encode("The quick brown fox")) < len("The quick brown fox")
    assert bpe.decode([bpe.start_id]) == ""  # <|endoftext|> is never printed


def test_bpe_vocab_size_too_small_is_rejected():
    with pytest.raises(TokenizerError, match="at least 257"):
        Tokenizer.train_bpe(TRAIN_TEXT, vocab_size=100)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, bpe, kind):
    tok = Tokenizer.train_char(TRAIN_TEXT) if kind == "char" else bpe
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.kind == kind and again.vocab_size == tok.vocab_size
    text = "私は学校へ行く fox"
    assert again.encode(text) == tok.encode(text)


def test_corrupt_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_stream_decoder_never_emits_half_a_character(bpe):
    text = "私は😀"
    decoder = StreamDecoder(bpe)
    pieces = [decoder.push(i) for i in bpe.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@given(st.lists(st.integers(0, 299), max_size=60))
def test_stream_decoder_pieces_join_to_the_whole_decode(bpe, ids):
    """Any ids, even byte fragments that never complete a character: same text as decode."""
    decoder = StreamDecoder(bpe)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == bpe.decode(ids)
