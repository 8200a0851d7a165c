"""`mlxgpt train --init-from CKPT`: fine-tune any mlxgpt checkpoint (e.g. a plain one made
by `mlxgpt import-hf`: config.json + model.safetensors + tokenizer.json, no training state)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from test_export_support import ALPHABET, CONFIGS, write_random_checkpoint

from mlxgpt.cli import main
from mlxgpt.config import ConfigError
from mlxgpt.train import resolve_config, train

CONFIG = dataclasses.replace(CONFIGS["bias-1layer-hs8"], vocab_size=len(ALPHABET))
TEXT = "the quick brown fox jumps over the lazy dog.\nPack my box with five dozen jugs!\n" * 30


def files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def plain_ckpt(tmp_path) -> Path:
    """A checkpoint without training state, with random weights and a char tokenizer."""
    return write_random_checkpoint(tmp_path / "src" / "gpt", CONFIG, seed=3)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def finetune_args(ckpt, corpus, out, *extra):
    return [
        "train",
        "--init-from",
        str(ckpt),
        "--data",
        str(corpus),
        "--out-dir",
        str(out),
        "--no-progress",
        "max_iters=30",
        "warmup_iters=0",
        "learning_rate=1e-2",
        "batch_size=8",
        "eval_interval=30",
        "eval_iters=2",
        "sample_tokens=0",
        *extra,
    ]


def test_finetuning_lowers_the_loss_and_keeps_the_tokenizer(capsys, plain_ckpt, corpus, tmp_path):
    before = files(plain_ckpt.parent)
    out = tmp_path / "tuned"
    assert main(finetune_args(plain_ckpt, corpus, out)) == 0
    assert f"(from {plain_ckpt})" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert rows[0]["step"] == 1 and len(losses) == 30  # step 0, fresh optimizer
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    saved = out / "ckpt"
    assert json.loads((saved / "tokenizer.json").read_text()) == json.loads(
        (plain_ckpt / "tokenizer.json").read_text()
    )
    assert json.loads((saved / "config.json").read_text()) == dataclasses.asdict(CONFIG)
    state = json.loads((saved / "state.json").read_text())
    assert state["step"] == 30 and state["init_from"] == str(plain_ckpt)
    assert files(plain_ckpt.parent) == before  # the source is never written to
    # the result is an ordinary run: it resumes
    assert main(["train", "--resume", str(out), "--no-progress", "max_iters=32"]) == 0


def test_training_keys_apply_and_only_dropout_may_change(plain_ckpt, corpus, tmp_path):
    cfg = resolve_config(
        None,
        {
            "data": str(corpus),
            "out_dir": str(tmp_path / "o"),
            "max_iters": "7",
            "warmup_iters": "1",
            "model": {"dropout": "0.2"},
        },
        init_from=str(plain_ckpt),
    )
    assert cfg.max_iters == 7 and cfg.model == dataclasses.replace(CONFIG, dropout=0.2)
    assert cfg.tokenizer == "char"
    for key in ("n_layer", "block_size", "n_embd"):
        with pytest.raises(ConfigError, match=f"model.{key} cannot change"):
            resolve_config(None, {"model": {key: "2"}}, init_from=str(plain_ckpt))
    with pytest.raises(ConfigError, match="char tokenizer"):
        resolve_config(None, {"tokenizer": "bpe"}, init_from=str(plain_ckpt))
    with pytest.raises(ConfigError, match="one of them"):
        resolve_config(None, {}, resume=str(plain_ckpt), init_from=str(plain_ckpt))


def test_text_outside_the_char_vocabulary_is_a_clear_error(capsys, plain_ckpt, tmp_path):
    corpus = tmp_path / "emoji.txt"
    corpus.write_text(TEXT + "café 😀\n")
    assert main(finetune_args(plain_ckpt, corpus, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "character vocabulary" in err and "😀" in err


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_the_source_checkpoint_is_never_an_out_dir(capsys, plain_ckpt, corpus, where):
    before = files(plain_ckpt.parent)
    out = {
        "same": plain_ckpt,
        "parent": plain_ckpt.parent,
        "inside": plain_ckpt / "tuned",
    }[where]
    assert main(finetune_args(plain_ckpt, corpus, out, "--overwrite")) == 2
    assert "overlap" in capsys.readouterr().err
    assert files(plain_ckpt.parent) == before


def test_library_call(plain_ckpt, corpus, tmp_path):
    cfg = resolve_config(
        None,
        {
            "data": str(corpus),
            "out_dir": str(tmp_path / "o"),
            "max_iters": "3",
            "warmup_iters": "0",
            "eval_iters": "1",
            "batch_size": "2",
        },
        init_from=str(plain_ckpt),
    )
    result = train(cfg, init_from=plain_ckpt, progress=False, quiet=True)
    assert result.start_step == 0 and result.step == 3
    assert result.model.config == CONFIG and result.tokenizer.vocab_size == CONFIG.vocab_size


def test_a_bpe_checkpoint_encodes_the_corpus_with_its_own_tokenizer(tmp_path, corpus):
    from safetensors.numpy import save_file
    from test_export_support import random_weights

    from mlxgpt.checkpoint import write_json
    from mlxgpt.data import encode_pieces
    from mlxgpt.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_bpe(["a different corpus entirely, with other words\n" * 50], 280)
    config = dataclasses.replace(CONFIG, vocab_size=tokenizer.vocab_size)
    ckpt = tmp_path / "bpe"
    ckpt.mkdir()
    save_file(random_weights(config), str(ckpt / "model.safetensors"))
    write_json(ckpt / "config.json", dataclasses.asdict(config))
    tokenizer.save(ckpt / "tokenizer.json")
    cfg = resolve_config(
        None,
        {
            "data": str(corpus),
            "out_dir": str(tmp_path / "o"),
            "max_iters": "2",
            "warmup_iters": "0",
            "eval_iters": "1",
            "batch_size": "2",
        },
        init_from=str(ckpt),
    )
    result = train(cfg, init_from=ckpt, progress=False, quiet=True)
    assert result.tokenizer.kind == "bpe" and cfg.tokenizer == "bpe"
    ids = [int(i) for piece in encode_pieces(tokenizer, [TEXT]) for i in piece]
    assert result.data.train[:50].tolist() == ids[:50]
