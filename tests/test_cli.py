"""The `mlxgpt` command: it works, and bad input gets one clear line, not a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mlxgpt.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_generate_from_the_command_line(capsys, corpus_file, tmp_path):
    out = tmp_path / "run"
    code, text, _ = run(
        capsys,
        "train",
        "--data",
        str(corpus_file),
        "--out-dir",
        str(out),
        "--max-iters",
        "12",
        "--no-progress",
        "batch_size=4",
        "eval_interval=6",
        "eval_iters=2",
        "warmup_iters=2",
        "sample_tokens=20",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.n_head=2",
        "model.block_size=16",
    )
    assert code == 0
    assert "val loss" in text and "--- sample" in text
    assert (out / "ckpt" / "model.safetensors").is_file()
    code, text, _ = run(
        capsys, "generate", str(out), "--prompt", "All:", "--max-tokens", "30", "--seed", "3"
    )
    # a char model has no end-of-text token: exactly 30 new characters, then the newline
    assert code == 0 and text.startswith("All:") and len(text) == len("All:") + 30 + 1
    again = run(
        capsys, "generate", str(out), "--prompt", "All:", "--max-tokens", "30", "--seed", "3"
    )[1]
    assert again == text  # same seed, same text


def test_generate_greedy_empty_prompt_and_token_budget(capsys, trained_ckpt):
    code, text, _ = run(
        capsys,
        "generate",
        str(trained_ckpt),
        "--prompt",
        "",
        "--max-tokens",
        "25",
        "--temperature",
        "0",
    )
    assert code == 0
    from mlxgpt.tokenizer import Tokenizer

    tok = Tokenizer.load(trained_ckpt / "tokenizer.json")
    assert len(tok.encode(text[:-1])) == 25  # char model: 25 tokens = 25 characters


def test_prompt_longer_than_context_keeps_its_tail(capsys, trained_ckpt):
    long_prompt = "Speak, speak. " * 10  # 140 chars > block_size 32
    code, text, err = run(
        capsys,
        "generate",
        str(trained_ckpt),
        "--prompt",
        long_prompt,
        "--max-tokens",
        "5",
        "--temperature",
        "0",
    )
    assert code == 0 and "context window" in err and text.startswith(long_prompt)


def test_prompt_outside_char_vocabulary(capsys, trained_ckpt):
    code, _, err = run(capsys, "generate", str(trained_ckpt), "--prompt", "Zebra 😀")
    assert code == 2
    assert "error:" in err and "character vocabulary" in err and "Traceback" not in err


def test_missing_and_corrupt_checkpoint(capsys, tmp_path, trained_ckpt):
    code, _, err = run(capsys, "generate", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad"
    shutil.copytree(trained_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "generate", str(bad))
    assert code == 2 and "corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "x", "--max-tokens", "-1"], "must be >= 0"),
        (["generate", "x", "--temperature", "hot"], "expected a number"),
        (["generate", "x", "--top-p", "0"], "must be in (0.0, 1.0]"),
        (["generate", "x", "--top-p", "1.5"], "must be in (0.0, 1.0]"),
        (["generate", "x", "--top-k", "2.5"], "expected a whole number"),
        (["train", "--max-iters", "0"], "must be >= 1"),
    ],
)
def test_invalid_numeric_options(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_config_key_and_bad_override(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--out-dir", str(tmp_path), "learning_rat=1")
    assert code == 2 and "unknown config key(s): learning_rat" in err
    code, _, err = run(capsys, "train", "--out-dir", str(tmp_path), "batch_size=-3")
    assert code == 2 and "batch_size must be >= 1" in err
    code, _, err = run(capsys, "train", "--out-dir", str(tmp_path), "oops")
    assert code == 2 and "key=value" in err
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('max_iters = 5\nmystery = "x"\n')
    code, _, err = run(capsys, "train", "--config", str(cfg))
    assert code == 2 and "mystery" in err


def test_data_file_errors(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "train", "--data", str(empty), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "is empty" in err
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)))
    code, _, err = run(capsys, "train", "--data", str(binary), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "not a text file" in err


def test_config_file_with_overrides(capsys, tmp_path, corpus_file):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "data": str(corpus_file),
                "out_dir": str(tmp_path / "o"),
                "max_iters": 4,
                "eval_interval": 4,
                "eval_iters": 1,
                "warmup_iters": 1,
                "sample_tokens": 0,
                "batch_size": 2,
                "model": {"n_layer": 1, "n_embd": 8, "n_head": 1, "block_size": 8},
            }
        )
    )
    code, _, _ = run(capsys, "train", "--config", str(cfg), "--no-progress", "model.n_head=2")
    assert code == 0
    saved = json.loads((tmp_path / "o" / "ckpt" / "train_config.json").read_text())
    assert saved["max_iters"] == 4 and saved["model"]["n_head"] == 2


def test_console_script_help_and_clean_error():
    exe = shutil.which("mlxgpt") or f"{sys.executable} -m mlxgpt.cli"
    for sub in ("train", "generate", "export", "viz"):
        res = subprocess.run([*exe.split(), sub, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: mlxgpt" in res.stdout
    res = subprocess.run(
        [*exe.split(), "generate", "/nonexistent/ckpt"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: checkpoint /nonexistent/ckpt does not exist")


def test_a_temperature_too_small_to_divide_by_generates_greedily(capsys, trained_ckpt):
    """--temperature 1e-320 used to overflow the logits to NaN and print one token forever."""
    common = ["generate", str(trained_ckpt), "--prompt", "All:", "--max-tokens", "30"]
    code, greedy, _ = run(capsys, *common, "--temperature", "0")
    assert code == 0
    for tiny in ("1e-320", "5e-324", "1e-7"):
        code, text, err = run(capsys, *common, "--temperature", tiny, "--seed", "1")
        assert code == 0 and err == "" and text == greedy
