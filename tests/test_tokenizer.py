"""Tokenizer round trips and errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxgpt.tokenizer import EOT, StreamDecoder, Tokenizer, TokenizerError, stream_text

TRAIN_TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "私は学校へ行く 😀🎉 " * 5]
# multi-byte characters of every UTF-8 length, emoji with modifiers and flags
UNICODE = "aé私😀👍🏽🇯🇵∑𝔘 \n"


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


# arbitrary text, and text made of the end-of-text token's literal and pieces of it
SPECIAL_HEAVY = st.lists(st.sampled_from([EOT, "<|end", "oftext|>", "<|", "a", "😀", " "]))


@settings(max_examples=150, deadline=None)
@given(st.text() | SPECIAL_HEAVY.map("".join))
def test_bpe_round_trips_arbitrary_text(bpe, text):
    """Any text comes back, except the literal ``<|endoftext|>``: it is that token (the
    document separator, the id every client of the file gives it), which decoding leaves
    out."""
    assert bpe.decode(bpe.encode(text)) == text.replace(EOT, "")


def test_the_end_of_text_literal_is_the_token(bpe):
    ids = bpe.encode(f"a{EOT}b")
    assert bpe.eos_id in ids and ids == bpe.encode("a") + [bpe.eos_id] + bpe.encode("b")


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


def char_tokenizer() -> Tokenizer:
    return Tokenizer.train_char([*TRAIN_TEXT, UNICODE])


def streamed(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The pieces a StreamDecoder returns; each running total must be a prefix of the whole."""
    whole = tokenizer.decode(ids)
    decoder, pieces = StreamDecoder(tokenizer), []
    for token in ids:
        pieces.append(decoder.push(token))
        assert whole.startswith("".join(pieces))  # never takes anything back
    pieces.append(decoder.flush())
    return pieces


def id_sequences(tokenizer: Tokenizer):
    """Random ids: any id of the vocabulary, mixed with the ids of text full of multi-byte
    characters and emoji (so byte-level tokens that split a character are common)."""
    vocab = tokenizer.vocab_size
    text = st.text(alphabet=st.sampled_from(UNICODE), max_size=12)
    chunks = st.one_of(st.integers(0, vocab - 1).map(lambda i: [i]), text.map(tokenizer.encode))
    return st.lists(chunks, max_size=25).map(lambda cs: [i for c in cs for i in c])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_streaming_gives_the_same_text_as_decoding_everything(bpe, data):
    for tokenizer in (bpe, char_tokenizer()):
        ids = data.draw(id_sequences(tokenizer))
        assert "".join(streamed(tokenizer, ids)) == tokenizer.decode(ids)
        assert "".join(stream_text(tokenizer, ids)) == tokenizer.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(UNICODE)))
def test_streaming_valid_text_never_emits_a_partial_character(bpe, text):
    pieces = streamed(bpe, bpe.encode(text))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streaming_decodes_a_few_ids_per_token_not_all_of_them(bpe, kind, monkeypatch):
    """O(1) per token: the ids handed to decode() stay a small multiple of the ids pushed.

    Re-decoding everything on every push (O(n) per token) hands it n^2 / 2 ids: 2 million
    for these 2,000 ids; the limit below is 10 per id.
    """
    tokenizer = char_tokenizer() if kind == "char" else bpe
    text = ("The quick 私は学校へ 😀👍🏽 fox. " * 200)[:4000]
    ids = tokenizer.encode(text)[:2000]
    decoded_ids = []
    real_decode = tokenizer.decode
    monkeypatch.setattr(
        tokenizer, "decode", lambda ids: decoded_ids.append(len(ids)) or real_decode(ids)
    )
    assert "".join(stream_text(tokenizer, ids)) == real_decode(ids)
    assert sum(decoded_ids) <= 10 * len(ids)
