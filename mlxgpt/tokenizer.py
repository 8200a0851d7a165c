"""Character and byte-level BPE tokenizers, both stored as a Hugging Face ``tokenizer.json``.

Both kinds are :mod:`tokenizers` objects, so one file format and one loader serve MLX
training, MLX generation and the onnxruntime runtime (this module never imports MLX):

* ``char``: one token per Unicode character seen in the corpus (a BPE model with no
  merges). Text with a character outside the vocabulary is rejected with a clear error.
* ``bpe``: byte-level BPE trained on the corpus. Every UTF-8 string round-trips exactly,
  because any byte has a token. ``<|endoftext|>`` separates documents.

An empty prompt starts from :attr:`Tokenizer.start_id` (``<|endoftext|>`` for BPE, the
newline character for ``char``), which is never printed. Generation stops at
:attr:`Tokenizer.eos_id` (``<|endoftext|>`` for BPE; ``char`` models have none).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

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
        return cls(hf)

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
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted :], len(text)
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
