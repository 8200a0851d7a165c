"""Corpus -> token ids -> train/validation split on disk -> random training windows.

The token ids of the corpus are written once to ``OUT_DIR/data/{train,val}.bin`` and read
back as ``numpy.memmap`` arrays, so corpora larger than memory work. The first
``1 - val_fraction`` of the tokens train, the rest validate (a contiguous split, as in
nanoGPT, so validation text is genuinely unseen). Batches are windows of
``block_size + 1`` tokens at positions drawn by a seeded ``numpy.random.Generator``; its
state is saved in checkpoints, which makes resumed runs draw exactly the same batches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from mlxgpt.errors import UserError
from mlxgpt.tokenizer import Tokenizer


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


def read_corpus(path: str | Path) -> list[str]:
    """The texts of a .txt file or of every .txt file under a folder (sorted by name)."""
    path = resolve_data_path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} contains no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data path {path} does not exist: pass a .txt file or a folder of them")
    texts = []
    for f in files:
        raw = f.read_bytes()
        if b"\0" in raw:
            raise DataError(f"{f} is not a text file (it contains NUL bytes)")
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(
                f"{f} is not UTF-8 text ({err.reason} at byte {err.start}); "
                "convert it to UTF-8 first"
            ) from None
    if not any(t.strip() for t in texts):
        raise DataError(f"{path} is empty: training needs some text")
    return texts


def encode_corpus(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.extend(tokenizer.doc_separator)
        ids.extend(tokenizer.encode(text))
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.asarray(ids, dtype=dtype)


class Dataset:
    """Memory-mapped train/validation token arrays plus the batch sampler."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        self.meta = meta
        self.train = np.memmap(directory / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(directory / "val.bin", dtype=dtype, mode="r")

    @staticmethod
    def prepare(
        texts: list[str],
        tokenizer: Tokenizer,
        directory: str | Path,
        val_fraction: float,
        block_size: int,
    ) -> Dataset:
        """Tokenize ``texts`` and write the split, unless an identical one is already there."""
        directory = Path(directory)
        digest = hashlib.sha256()
        for t in texts:
            digest.update(t.encode("utf-8"))
        digest.update(tokenizer.hf.to_str().encode("utf-8"))
        digest.update(str(val_fraction).encode())
        key = digest.hexdigest()
        meta_path = directory / "meta.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
            return Dataset(directory)
        ids = encode_corpus(texts, tokenizer)
        n_val = int(len(ids) * val_fraction)
        train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
        for name, split in (("train", train), ("val", val)):
            if len(split) < block_size + 1:
                raise DataError(
                    f"the {name} split has {len(split)} tokens but one training window needs "
                    f"block_size + 1 = {block_size + 1}: use more text, a smaller "
                    "model.block_size, or a different val_fraction"
                )
        directory.mkdir(parents=True, exist_ok=True)
        for name, split in (("train", train), ("val", val)):
            split.tofile(directory / f"{name}.bin")
        meta: dict[str, Any] = {
            "key": key,
            "dtype": str(ids.dtype),
            "train_tokens": int(len(train)),
            "val_tokens": int(len(val)),
        }
        meta_path.write_text(json.dumps(meta, indent=2))
        return Dataset(directory)

    def batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets, each ``(batch_size, block_size)`` int32."""
        data = self.train if split == "train" else self.val
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        windows = np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int32)
        return windows[:, :-1], windows[:, 1:]
