"""The corpus reader, the streamed encoder and the token cache in OUT_DIR/data/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxgpt import data as data_module
from mlxgpt.cli import main
from mlxgpt.data import Corpus, DataError, Dataset, encode_pieces
from mlxgpt.tokenizer import Tokenizer, TokenizerError

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
BPE = Tokenizer.train_bpe([SHAKESPEARE + " 私は学校へ行く 😀"], 320)
CHAR = Tokenizer.train_char([SHAKESPEARE])

TINY = [
    "--no-progress",
    "batch_size=2",
    "eval_iters=1",
    "warmup_iters=1",
    "sample_tokens=0",
    "model.n_layer=1",
    "model.n_embd=8",
    "model.n_head=2",
]


def cli_train(capsys, data, out, *argv):
    flags = [a for a in argv if a.startswith("--")]
    code = main(
        ["train", "--data", str(data), "--out-dir", str(out), *flags, *TINY]
        + [a for a in argv if a not in flags]
    )
    return code, capsys.readouterr().err


def ids_of(pieces):
    arrays = list(encode_pieces(BPE if pieces[1] == "bpe" else CHAR, pieces[0]))
    return np.concatenate([np.zeros(0, np.int64), *arrays]).tolist()


# -- encoding piece by piece is exactly encoding the whole -----------------------------------
TEXT = st.lists(
    st.sampled_from(list("ab Z \n\n\t  !.,'9") + ["<|endoftext|>", "<|end", "私", "😀"]),
    max_size=40,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(0, 60), max_size=6))
def test_bpe_in_pieces_equals_one_call(text, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    assert ids_of((pieces, "bpe")) == BPE.hf.encode(text).ids


def test_long_text_in_pieces_equals_one_call():
    pieces = [SHAKESPEARE[i : i + 997] for i in range(0, len(SHAKESPEARE), 997)]
    assert ids_of((pieces, "bpe")) == BPE.hf.encode(SHAKESPEARE).ids
    assert ids_of((pieces, "char")) == CHAR.hf.encode(SHAKESPEARE).ids


def test_char_encoder_refuses_unknown_characters_with_the_tokenizers_message():
    with pytest.raises(TokenizerError, match="character vocabulary: '😀'"):
        list(encode_pieces(CHAR, ["First ", "Citizen 😀"]))


# -- the corpus reader ----------------------------------------------------------------------
def test_bad_utf8_names_the_byte_across_piece_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "READ_BYTES", 4)
    path = tmp_path / "t.txt"
    path.write_bytes("héllo wörld".encode() + b" caf\xe9!")
    with pytest.raises(DataError, match="at byte 17"):
        Corpus(path).fingerprint()
    path.write_bytes(b"fine text\n" * 3 + b"\x00")
    with pytest.raises(DataError, match="NUL"):
        Corpus(path).fingerprint()


def test_pieces_rejoin_to_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "READ_BYTES", 5)
    (tmp_path / "a.txt").write_text("私は学校へ行く 😀 and more")
    (tmp_path / "b.txt").write_text("second")
    docs = ["".join(d) for d in Corpus(tmp_path).documents()]
    assert docs == ["私は学校へ行く 😀 and more", "second"]


# -- the cache ------------------------------------------------------------------------------
def prepare(corpus_path, directory, tokenizer=CHAR, block_size=16):
    return Dataset.prepare(Corpus(corpus_path), tokenizer, directory, 0.1, block_size)


def test_cache_is_reused_and_every_file_boundary_is_in_its_key(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, parts in (
        (one, ("First Citizen", ":\n" * 20)),
        (two, ("First", " Citizen" + ":\n" * 20)),
    ):
        folder.mkdir()
        for i, part in enumerate(parts):
            (folder / f"{i}.txt").write_text(part)
    a = prepare(one, tmp_path / "cache", block_size=2)
    stamp = (tmp_path / "cache" / "tokens.bin").stat().st_mtime_ns
    assert prepare(one, tmp_path / "cache", block_size=2).meta == a.meta  # reused...
    assert (tmp_path / "cache" / "tokens.bin").stat().st_mtime_ns == stamp  # ...not rewritten
    first = np.array(a.train).tolist()
    b = prepare(two, tmp_path / "cache", block_size=2)  # same text, other split into documents
    assert np.array(b.train).tolist() != first


@pytest.mark.parametrize("damage", ["meta-cut", "meta-garbage", "tokens-half", "tokens-garbage"])
def test_damaged_cache_is_rebuilt(tmp_path, corpus_file, damage):
    cache = tmp_path / "cache"
    good = prepare(corpus_file, cache)
    expected = (np.array(good.train).tolist(), np.array(good.val).tolist())
    del good
    meta, tokens = cache / "meta.json", cache / "tokens.bin"
    if damage == "meta-cut":
        meta.write_text(meta.read_text()[:20])
    elif damage == "meta-garbage":
        meta.write_text('["not", "a", "cache"]')
    elif damage == "tokens-half":
        tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    else:
        tokens.write_bytes(b"\xff" * tokens.stat().st_size)  # ids far outside the vocabulary
    again = prepare(corpus_file, cache)
    assert (np.array(again.train).tolist(), np.array(again.val).tolist()) == expected


def test_damaged_cache_resumes_with_the_same_batches(capsys, corpus_file, tmp_path):
    """From the command line, on an out_dir whose cache was damaged by hand: no traceback
    and no crash, the cache is rebuilt and the resumed run sees exactly the same data."""
    ref, bad = tmp_path / "ref", tmp_path / "bad"
    args = ["max_iters=8", "stop_at=4", "eval_interval=4", "model.block_size=16"]
    assert cli_train(capsys, corpus_file, ref, *args)[0] == 0
    shutil.copytree(ref, bad)
    for f in (bad / "data").iterdir():  # every cache file, whatever the layout
        f.write_bytes(b"\x07" * (f.stat().st_size // 2 + 1))
    for out in (ref, bad):
        code = main(["train", "--resume", str(out), "--out-dir", str(out), "--no-progress"])
        assert code == 0, capsys.readouterr().err
    capsys.readouterr()

    def losses(out):
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(bad) == losses(ref) and len(losses(ref)) == 8


def test_larger_context_in_a_reused_out_dir_is_a_clear_error(capsys, tmp_path):
    """The cache of a first run must not skip the window check of a second one."""
    corpus = tmp_path / "small.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 8)  # 35 val tokens
    out = tmp_path / "run"
    assert cli_train(capsys, corpus, out, "max_iters=2", "model.block_size=16")[0] == 0
    code, err = cli_train(capsys, corpus, out, "--overwrite", "max_iters=2", "model.block_size=64")
    assert code == 2 and "block_size + 1 = 65" in err and "Traceback" not in err


def test_a_data_folder_of_the_users_is_never_replaced(capsys, corpus_file, tmp_path):
    """`--out-dir .` in a project whose data/ holds the user's texts."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("my texts")
    code, err = cli_train(capsys, corpus_file, tmp_path, "max_iters=2", "model.block_size=16")
    assert code == 2 and "not mlxgpt's token cache" in err
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["corpus.txt"]


def test_bench_data_smoke(tmp_path):
    """scripts/bench_data.py on a tiny corpus: it runs and reports what it measures."""
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_data.py"),
            "--mb",
            "0.05",
            "--legacy-mb",
            "0.03",
            "--repeats",
            "1",
            "--tokenizers",
            "char",
            "bpe",
            "--bpe-vocab",
            "300",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "peak RSS" in res.stdout and "MB/s" in res.stdout
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
