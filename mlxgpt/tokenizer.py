"""Character and byte-level BPE tokenizers, both stored as a Hugging Face ``tokenizer.json``.

Both kinds are :mod:`tokenizers` objects, so one file format and one loader serve MLX
training, MLX generation and the onnxruntime runtime (this module never imports MLX):

* ``char``: one token per Unicode character seen in the corpus (a BPE model with no
  merges). Text with a character outside the vocabulary is rejected with a clear error.
* ``bpe``: byte-level BPE trained on the corpus. Every UTF-8 string round-trips exactly,
  because any byte has a token, except the literal ``<|endoftext|>``: it is the special
  token that separates documents (in a corpus file too), as in every client of the
  ``tokenizer.json``, and decoding leaves special tokens out.

A ``char`` tokenizer also lists every character as a (non-special) added token. That
changes no id: the added tokens carry the ids the vocabulary already gives them, and they
split the text into exactly the characters the model would. It makes the file readable by
tokenizer implementations that treat any BPE model as *byte-level* BPE (onnxruntime-genai's
tokenizer maps a space to GPT-2's ``Ġ`` and finds no such token): added tokens are matched
on the raw text before any model runs, in every implementation. Older files are converted
with :meth:`Tokenizer.for_clients` (the ONNX exporter does it).

An empty prompt starts from :attr:`Tokenizer.start_id` (``<|endoftext|>`` for BPE, the
newline character for ``char``), which is never printed. Generation stops at
:attr:`Tokenizer.eos_id` (``<|endoftext|>`` for BPE; ``char`` models have none).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from mlxgpt.errors import UserError

EOT = "<|endoftext|>"


class TokenizerError(UserError, ValueError):
    """Text or a tokenizer file the tokenizer cannot handle; the message says why."""


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.kind = "char" if hf.pre_tokenizer is None else "bpe"
        self.vocab = hf.get_vocab()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        chars = sorted(set().union(*(set(t) for t in texts)))
        if not chars:
            raise TokenizerError("cannot build a character vocabulary from empty text")
        hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        hf.decoder = decoders.Fuse()
        return cls(hf).for_clients()

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        minimum = 256 + 1
        if vocab_size < minimum:
            raise TokenizerError(
                f"bpe vocab size must be at least {minimum} (256 bytes + {EOT}), got {vocab_size}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)  # streamed: never all in memory
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} is missing")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"tokenizer file {path} is corrupt: {err}") from None

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def for_clients(self) -> Tokenizer:
        """This tokenizer in the form every client reads alike (same ids for any text).

        For ``char``: every character of the vocabulary becomes a non-special added token
        with its existing id (see the module docstring); a file that has them already, and
        any ``bpe`` tokenizer, is returned unchanged.
        """
        if self.kind != "char":
            return self
        added = self.hf.get_added_tokens_decoder()
        missing = [c for c, i in sorted(self.vocab.items(), key=lambda x: x[1]) if i not in added]
        if not missing:
            return self
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.add_tokens([AddedToken(c, normalized=False, special=False) for c in missing])
        converted = Tokenizer(hf)
        if converted.vocab != self.vocab:  # add_tokens reuses vocabulary ids; check it did
            raise TokenizerError("internal error: converting the character vocabulary changed ids")
        return converted

    # -- use ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def start_id(self) -> int:
        if self.kind == "bpe":
            return self.vocab[EOT]
        return self.vocab.get("\n", 0)

    @property
    def eos_id(self) -> int | None:
        """The token that ends a text: generation stops when it is drawn (not printed).

        ``<|endoftext|>`` for BPE (it separates the documents of the training corpus, so
        the model learns to emit it where a text ends); ``None`` for ``char`` models,
        whose start token (the newline) is an ordinary character and never ends a text.
        """
        return self.vocab.get(EOT) if self.kind == "bpe" else None

    @property
    def doc_separator(self) -> list[int]:
        """Ids placed between documents when a corpus has several files."""
        return [self.start_id]

    def encode(self, text: str) -> list[int]:
        if self.kind == "char":
            unknown = sorted(set(text) - set(self.vocab))
            if unknown:
                shown = ", ".join(repr(c) for c in unknown[:10])
                raise TokenizerError(
                    f"text contains {len(unknown)} character(s) not in this model's "
                    f"character vocabulary: {shown}. Use only characters from the training "
                    "corpus, or train with tokenizer=bpe, which accepts any text."
                )
        return self.hf.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


class StreamDecoder:
    """Turns ids, pushed one at a time, into text pieces that add up to ``decode(all ids)``.

    Invariant: the pieces returned so far are exactly the text of ``ids[:read]`` (every id
    pushed before ``read``), and the decoder keeps only a short window ``ids[prefix:]``,
    where ``ids[prefix:read]`` are the ids of the last piece returned. Each :meth:`push`
    decodes that window alone and returns what its text adds beyond the text of
    ``ids[prefix:read]``. This is the same text as decoding everything from the start
    because ``prefix`` always sits where the text before it ends on a complete character:
    both kinds of decoder here (``Fuse`` for characters, ``ByteLevel`` for BPE) then just
    concatenate, and the context ids keep a decoder that treats a sequence's first token
    specially from changing the boundary. A push therefore decodes a few ids, not all of
    them (re-decoding every id on each push cost ~10 ms per token at 100k ids:
    ``scripts/bench_stream.py``).

    A window whose text ends in U+FFFD (a byte-level token that stops inside a multi-byte
    UTF-8 character) or adds nothing (a skipped special token such as ``<|endoftext|>``) is
    held back until a later id completes it; :meth:`flush` returns whatever is still held.
    A character spans at most four bytes, so the window stays a few ids long for any text;
    only a run of ids that never forms a valid character (invalid bytes) grows it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._window: list[int] = []  # ids[prefix:]
        self._read = 0  # ids[prefix:prefix + _read] are the last returned piece's ids
        self._context = ""  # their text, decoded on their own

    def push(self, token: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self._window.append(token)
        text = self.tokenizer.decode(self._window)
        if len(text) <= len(self._context) or text.endswith("\ufffd"):
            return ""
        piece = text[len(self._context) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._context = self.tokenizer.decode(self._window)
        return piece

    def flush(self) -> str:
        """The text still held back (e.g. an incomplete character at the very end)."""
        piece = self.tokenizer.decode(self._window)[len(self._context) :]
        self._window, self._read, self._context = [], 0, ""
        return piece


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt``; an empty prompt starts from the tokenizer's start token."""
    return tokenizer.encode(prompt) if prompt else [tokenizer.start_id]


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces for a stream of token ids, as soon as they are complete characters.

    Shared by MLX generation and the onnxruntime runtime so both stream the same text.
    """
    decoder = StreamDecoder(tokenizer)
    for token in tokens:
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
