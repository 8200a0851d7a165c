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


# -- the char tokenizer in the form every client reads (Tokenizer.for_clients) ---------------
CHAR_ALPHABET = "ab \n\r\t.,'!-é€😀ñ\u0301字"


def _char_tokenizer_as_written_before() -> Tokenizer:
    """A char tokenizer file as mlxgpt wrote it before characters were added tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    chars = sorted(set(CHAR_ALPHABET))
    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    hf.decoder = decoders.Fuse()
    return Tokenizer(hf)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=CHAR_ALPHABET))
def test_char_tokenizer_for_clients_gives_the_same_ids_for_any_text(text):
    """Training data and checkpoints depend on the ids: the conversion must not change one."""
    old = _char_tokenizer_as_written_before()
    new = old.for_clients()
    assert new.encode(text) == old.encode(text)
    assert len(new.encode(text)) == len(text)
    assert new.decode(new.encode(text)) == text == old.decode(old.encode(text))


def test_char_tokenizer_for_clients_lists_every_character_as_an_added_token(tmp_path):
    old = _char_tokenizer_as_written_before()
    new = old.for_clients()
    added = new.hf.get_added_tokens_decoder()
    assert {i: t.content for i, t in added.items()} == {i: c for c, i in old.vocab.items()}
    assert not any(t.special for t in added.values())  # decode never skips a character
    assert new.vocab == old.vocab and new.kind == "char" and new.start_id == old.start_id
    new.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").for_clients().hf.to_str() == new.hf.to_str()
    assert Tokenizer.train_char([CHAR_ALPHABET]).hf.to_str() == new.hf.to_str()  # new files too
