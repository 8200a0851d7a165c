"""Corpus -> token ids on disk -> train/validation split -> random training windows.

The corpus is never held in memory whole: :class:`Corpus` reads its files in pieces of
``READ_BYTES``, and :meth:`Dataset.prepare` encodes piece by piece straight into
``OUT_DIR/data/tokens.bin`` (one ``uint16``/``uint32`` array; documents joined by the
tokenizer's separator), so peak memory stays bounded whatever the corpus size
(``scripts/bench_data.py`` measures it). Training reads the file back as a
``numpy.memmap``: the first ``1 - val_fraction`` of the tokens train, the rest validate (a
contiguous split, as in nanoGPT, so validation text is genuinely unseen).

The cache (``tokens.bin`` + ``meta.json``) is written atomically and keyed by everything
its content depends on: the bytes of every file, the tokenizer and ``val_fraction``. On
reuse it is checked (format, key, file size, token-id range) and rebuilt when stale or
corrupt; the window check (``block_size + 1`` tokens per split) runs every time, since it
depends on the run, not the cache.

Batches are windows of ``block_size + 1`` tokens at positions drawn by a
:class:`BatchSampler`, a seeded ``numpy.random.Generator`` whose state is saved in
checkpoints, which makes resumed runs draw exactly the same batches.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mlxgpt.checkpoint import write_atomic_dir
from mlxgpt.errors import UserError
from mlxgpt.tokenizer import Tokenizer

READ_BYTES = 1 << 17  # corpus piece size: bounds the memory of encoding (~200 B/char in BPE)
CACHE_FORMAT = 2
TOKENS_FILE, META_FILE = "tokens.bin", "meta.json"
# what an mlxgpt data cache folder may hold (train.bin/val.bin: the format before 2)
CACHE_ENTRIES = frozenset((TOKENS_FILE, META_FILE, "train.bin", "val.bin"))


class DataError(UserError, ValueError):
    """Training data that cannot be used; the message says why and what to do."""


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as given, or, for a relative path that does not exist here, the same path
    inside the mlxgpt project folder (a checkout) or, for ``data/NAME``, the corpus
    installed with the package as ``mlxgpt/corpus/NAME`` (pyproject.toml ships the
    repository's ``data/`` there), so ``data/tinyshakespeare.txt`` works from anywhere."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    package = Path(__file__).resolve().parent
    candidates = [package.parent / path]
    if path.parts[:1] == ("data",):
        candidates.append(package.joinpath("corpus", *path.parts[1:]))
    return next((c for c in candidates if c.exists()), path)


class Corpus:
    """The texts of a .txt file or of every .txt file under a folder (sorted by name),
    read in pieces and checked as they are read (UTF-8, no NUL bytes)."""

    def __init__(self, path: str | Path):
        self.path = resolve_data_path(path)
        self._fingerprint: str | None = None
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*.txt") if p.is_file())
            if not self.files:
                raise DataError(f"folder {self.path} contains no .txt files")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise DataError(
                f"data path {self.path} does not exist: pass a .txt file or a folder of them"
            )

    def read(self, file: Path, on_bytes: Callable[[bytes], object] | None = None) -> Iterator[str]:
        """The text of one file in pieces; ``on_bytes(chunk)`` sees the raw bytes."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(file, "rb") as f:
            while True:
                raw = f.read(READ_BYTES)
                final = not raw
                if b"\0" in raw:
                    raise DataError(f"{file} is not a text file (it contains NUL bytes)")
                if on_bytes is not None and raw:
                    on_bytes(raw)
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(raw, final=final)
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{file} is not UTF-8 text ({err.reason} at byte "
                        f"{offset - pending + err.start}); convert it to UTF-8 first"
                    ) from None
                offset += len(raw)
                if text:
                    yield text
                if final:
                    return

    def documents(self) -> Iterator[Iterator[str]]:
        """One piece iterator per file."""
        for file in self.files:
            yield self.read(file)

    def pieces(self) -> Iterator[str]:
        """All the text, file after file, in pieces (for building a vocabulary)."""
        for document in self.documents():
            yield from document

    def fingerprint(self) -> str:
        """SHA-256 of every file's length and bytes (not its name), read once (then
        remembered); also checks that the corpus is readable text and not empty."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            has_text = False
            for file in self.files:
                digest.update(f"\0file {file.stat().st_size}\0".encode())
                for piece in self.read(file, on_bytes=digest.update):
                    has_text = has_text or not piece.isspace()
            if not has_text:
                raise DataError(f"{self.path} is empty: training needs some text")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


# -- encoding in pieces ---------------------------------------------------------------------
def _char_table(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray] | None:
    """Sorted code points of a char vocabulary and their ids (None if not one char each)."""
    if tokenizer.kind != "char" or any(len(c) != 1 for c in tokenizer.vocab):
        return None
    items = sorted((ord(c), i) for c, i in tokenizer.vocab.items())
    return np.array([c for c, _ in items], np.uint32), np.array([i for _, i in items], np.int64)


def encode_pieces(tokenizer: Tokenizer, pieces: Iterable[str]) -> Iterator[np.ndarray]:
    """Token ids of ``"".join(pieces)``, exactly as one ``tokenizer.encode`` call gives them,
    produced piece by piece.

    Character vocabularies map each character alone (done with a numpy lookup table, ~100x
    faster than calling the tokenizer). A byte-level BPE pre-tokenizer splits text into
    words and BPE never merges across words, but a word cut by a piece boundary would come
    out differently; so the last two words of each piece are held back and encoded with
    the next piece (the pre-tokenizer's split before a word depends only on what follows
    it by one character), and so is a special token (``<|endoftext|>``) cut in two.
    """
    table = _char_table(tokenizer)
    specials = [t.content for t in tokenizer.hf.get_added_tokens_decoder().values()]
    carry = ""
    for piece in pieces:
        if table is not None:
            yield _encode_chars(tokenizer, table, piece)
            continue
        text = carry + piece
        encoding = tokenizer.hf.encode(text)
        keep = _safe_prefix(encoding, _cut_special(text, specials))
        if keep == 0:
            carry = text  # too few words to know where one safely ends: read on
            continue
        carry = text[encoding.token_to_chars(keep)[0] :]
        yield np.array(encoding.ids[:keep], dtype=np.int64)
    if carry:
        yield np.array(tokenizer.encode(carry), dtype=np.int64)


def _cut_special(text: str, specials: list[str]) -> int:
    """Where a special token begins that ``text`` ends in the middle of (else its length)."""
    cut = len(text)
    for special in specials:
        for n in range(1, len(special)):
            if text.endswith(special[:n]):
                cut = min(cut, len(text) - n)
    return cut


def _safe_prefix(encoding: Any, limit: int) -> int:
    """How many tokens of ``encoding`` come out the same whatever text follows: the words
    before the last two, and before any word reaching ``limit``. Looks at the tail only."""

    def word(i: int) -> int:
        w = encoding.token_to_word(i)
        return -1 if w is None else w

    i = len(encoding) - 1
    if i < 0:
        return 0
    cut_word = word(i) - 1
    while i >= 0 and (word(i) >= cut_word or encoding.token_to_chars(i)[1] > limit):
        cut_word = min(cut_word, word(i))
        i -= 1
    return i + 1 if cut_word >= 1 else 0


def _encode_chars(
    tokenizer: Tokenizer, table: tuple[np.ndarray, np.ndarray], text: str
) -> np.ndarray:
    codes, ids = table
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    where = np.minimum(np.searchsorted(codes, points), len(codes) - 1)
    if not np.array_equal(codes[where], points):
        tokenizer.encode(text)  # raises the tokenizer's error naming the unknown characters
        raise AssertionError("unreachable: the tokenizer accepted an unknown character")
    return ids[where]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def encode_corpus_to(corpus: Corpus, tokenizer: Tokenizer, out: BinaryIO) -> int:
    """Write the corpus's token ids to ``out`` (documents joined by the tokenizer's
    separator); returns the number of tokens."""
    dtype = token_dtype(tokenizer.vocab_size)
    separator = np.array(tokenizer.doc_separator, dtype=dtype)
    n = 0
    for i, document in enumerate(corpus.documents()):
        if i:
            out.write(separator.tobytes())
            n += len(separator)
        for ids in encode_pieces(tokenizer, document):
            out.write(ids.astype(dtype).tobytes())
            n += len(ids)
    return n


# -- the cache and the dataset --------------------------------------------------------------
def cache_key(corpus_fingerprint: str, tokenizer: Tokenizer, val_fraction: float) -> str:
    digest = hashlib.sha256(f"format {CACHE_FORMAT}\0{corpus_fingerprint}\0".encode())
    digest.update(tokenizer.hf.to_str().encode("utf-8"))
    digest.update(f"\0{val_fraction!r}".encode())
    return digest.hexdigest()


def _max_id(tokens: np.ndarray, block: int = 1 << 24) -> int:
    """Largest id in a (memory-mapped) array, read in blocks so memory stays bounded."""
    return max((int(tokens[i : i + block].max()) for i in range(0, len(tokens), block)), default=0)


class Dataset:
    """The memory-mapped token ids of a corpus, split into ``train`` and ``val``."""

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.directory = directory
        self.meta = meta
        tokens = np.memmap(directory / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r")
        self.train = tokens[: meta["train_tokens"]]
        self.val = tokens[meta["train_tokens"] :]

    @classmethod
    def load(cls, directory: str | Path, key: str, vocab_size: int) -> Dataset | None:
        """The cache in ``directory`` if it is complete, current and sound, else None."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"])
            n_train, n_val = meta["train_tokens"], meta["val_tokens"]
            size = (directory / TOKENS_FILE).stat().st_size
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if (
            meta.get("format") != CACHE_FORMAT
            or meta.get("key") != key
            or dtype != token_dtype(vocab_size)
            or not all(isinstance(n, int) and n >= 0 for n in (n_train, n_val))
            or size != (n_train + n_val) * dtype.itemsize
            or size == 0
        ):
            return None
        data = cls(directory, meta)
        if max(_max_id(data.train), _max_id(data.val)) >= vocab_size:
            return None
        return data

    @classmethod
    def prepare(
        cls,
        corpus: Corpus,
        tokenizer: Tokenizer,
        directory: str | Path,
        val_fraction: float,
        block_size: int,
        clean_stale: bool = False,
    ) -> Dataset:
        """The token cache of ``corpus`` in ``directory``: reused when sound and current,
        otherwise (re)built; then checked to hold one window per split. ``clean_stale``:
        also remove what a crashed earlier build left (only while holding the out_dir lock).
        """
        directory = Path(directory)
        key = cache_key(corpus.fingerprint(), tokenizer, val_fraction)
        data = cls.load(directory, key, tokenizer.vocab_size)
        if data is None:
            _check_cache_folder(directory)
            meta: dict[str, Any] = {}

            def write(tmp: Path) -> None:
                with open(tmp / TOKENS_FILE, "wb") as f:
                    n = encode_corpus_to(corpus, tokenizer, f)
                n_val = int(n * val_fraction)
                meta.update(
                    format=CACHE_FORMAT,
                    key=key,
                    dtype=token_dtype(tokenizer.vocab_size).name,
                    train_tokens=n - n_val,
                    val_tokens=n_val,
                )
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

            write_atomic_dir(directory, write, clean_stale=clean_stale)
            data = cls(directory, meta)
        data.check_windows(block_size)
        return data

    def check_windows(self, block_size: int) -> None:
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split) < block_size + 1:
                raise DataError(
                    f"the {name} split has {len(split)} tokens but one training window needs "
                    f"block_size + 1 = {block_size + 1}: use more text, a smaller "
                    "model.block_size, or a different val_fraction"
                )

    def batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets, each ``(batch_size, block_size)`` int32."""
        data = self.train if split == "train" else self.val
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        windows = np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int32)
        return windows[:, :-1], windows[:, 1:]


def _check_cache_folder(directory: Path) -> None:
    """Refuse to replace a ``data/`` folder that is not an mlxgpt cache (a user's)."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise DataError(f"{directory} is not a folder: mlxgpt keeps its token cache there")
    if directory.is_dir():
        foreign = sorted(set(os.listdir(directory)) - CACHE_ENTRIES)
        if foreign:
            raise DataError(
                f"{directory} holds files that are not mlxgpt's token cache "
                f"({', '.join(foreign[:5])}); mlxgpt will not replace it: "
                "choose another out_dir"
            )


class BatchSampler:
    """Training batches from one split at positions drawn by a seeded generator.

    Its :meth:`state` goes into checkpoints (JSON) and :meth:`set_state` restores it, so a
    resumed run draws exactly the batches an uninterrupted one would. A distributed run
    has one per data stream (:class:`mlxgpt.distributed.StreamSampler`, seeds
    ``[seed, stream]``) and saves each one's state.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        block_size: int,
        seed: int | list[int],
        split: str = "train",
    ):
        self.data, self.split = data, split
        self.batch_size, self.block_size = batch_size, block_size
        self.rng = np.random.default_rng(seed)

    def next(self, micro_batches: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets, each ``(micro_batches, batch_size, block_size)`` int32."""
        pairs = [
            self.data.batch(self.split, self.batch_size, self.block_size, self.rng)
            for _ in range(micro_batches)
        ]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

    def state(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.rng.bit_generator.state, default=int))

    def set_state(self, state: Any) -> None:
        """Restore a saved :meth:`state`; ``ValueError`` if it is not one."""
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"not a data-sampler state: {err}") from None
