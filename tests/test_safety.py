"""Lose nothing: what `mlxgpt` may delete or overwrite, and what it must refuse."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_export_support import CONFIGS, write_random_checkpoint

from mlxgpt import checkpoint
from mlxgpt.checkpoint import resolve, write_atomic_dir
from mlxgpt.cli import main
from mlxgpt_export import exporter
from mlxgpt_export.errors import ExportError
from mlxgpt_export.exporter import export_checkpoint

TINY = [
    "--no-progress",
    "batch_size=4",
    "eval_iters=1",
    "warmup_iters=1",
    "sample_tokens=0",
    "model.n_layer=1",
    "model.n_embd=16",
    "model.n_head=2",
    "model.block_size=16",
]


def train_cli(capsys, corpus, out, *extra, max_iters=6):
    flags = [e for e in extra if e.startswith("--")]  # options before the key=value list
    code = main(
        ["train", "--data", str(corpus), "--out-dir", str(out), "--max-iters", str(max_iters)]
        + flags
        + TINY
        + [f"eval_interval={max_iters}", f"ckpt_interval={max_iters}"]
        + [e for e in extra if e not in flags]
    )
    _, err = capsys.readouterr()
    return code, err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ckpt", CONFIGS["bias-4layer-hs7-gelutanh"]
    )


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    return path


# -- mlxgpt export --force ------------------------------------------------------------------
def test_export_force_refuses_a_folder_that_is_not_an_export(ckpt, tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    assert main(["export", str(ckpt), str(mine), "--force", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an mlxgpt export folder" in err
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left


def test_export_force_refuses_the_working_folder(ckpt, tmp_path, monkeypatch, capsys):
    cwd = user_folder(tmp_path / "project")
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    for target in (".", str(cwd)):
        assert main(["export", str(ckpt), target, "--force", "--no-verify"]) == 2
        assert "not an mlxgpt export folder" in capsys.readouterr().err
    assert snapshot(cwd) == before


def test_export_force_refuses_an_export_folder_with_extra_files(ckpt, tmp_path):
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, verify=False, quiet=True)
    (out / "README.md").write_text("my own description")
    with pytest.raises(ExportError, match="not an mlxgpt export folder"):
        export_checkpoint(ckpt, out, force=True, verify=False, quiet=True)
    assert (out / "README.md").read_text() == "my own description"
    (out / "README.md").unlink()
    (out / "onnx" / "notes.txt").write_text("mine too")  # inside the model folder as well
    with pytest.raises(ExportError, match="not an mlxgpt export folder"):
        export_checkpoint(ckpt, out, force=True, verify=False, quiet=True)
    assert (out / "onnx" / "notes.txt").read_text() == "mine too"


def test_export_force_replaces_an_export_or_an_empty_folder(ckpt, tmp_path):
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, verify=False, quiet=True)
    written = {p.name for p in out.iterdir()}
    assert written == set(exporter.EXPORT_ENTRIES)  # the list --force trusts is complete
    assert {p.name for p in (out / "onnx").iterdir()} <= exporter.MODEL_DIR_ENTRIES
    assert exporter.is_export_folder(out)
    export_checkpoint(ckpt, out, force=True, verify=False, quiet=True)
    assert {p.name for p in out.iterdir()} == written
    empty = tmp_path / "empty"
    empty.mkdir()
    export_checkpoint(ckpt, empty, force=True, verify=False, quiet=True)
    assert {p.name for p in empty.iterdir()} == written
    # a folder that merely has the right file names is not an export
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    assert not exporter.is_export_folder(fake)


# -- atomic folder writes -------------------------------------------------------------------
def test_atomic_write_never_touches_siblings_it_did_not_create(tmp_path):
    target = tmp_path / "ck"
    tmp_user = user_folder(tmp_path / "ck.tmp")
    old_user = user_folder(tmp_path / "ck.old")
    before = {p: snapshot(p) for p in (tmp_user, old_user)}
    write_atomic_dir(target, lambda d: (d / "a.txt").write_text("1"))
    write_atomic_dir(target, lambda d: (d / "a.txt").write_text("2"))
    assert (target / "a.txt").read_text() == "2"
    assert {p: snapshot(p) for p in (tmp_user, old_user)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck.old", "ck.tmp"]


def test_atomic_write_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "ck"
    target.write_text("a file of mine")
    with pytest.raises(checkpoint.CheckpointError, match="not a folder"):
        write_atomic_dir(target, lambda d: (d / "a.txt").write_text("1"))
    assert target.read_text() == "a file of mine"


def test_crash_between_the_renames_is_recovered_and_cleaned(trained_ckpt, tmp_path, monkeypatch):
    """Killed after the old checkpoint was moved aside but before the new one moved in:
    loading finds the old copy; the next save (holding the run's lock) cleans up."""
    from mlxgpt.model_io import load_model

    out = tmp_path / "run"
    shutil.copytree(trained_ckpt, out / "ckpt")
    real_replace = os.replace
    calls = []

    def crash_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill -9 at this moment
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second_rename)

    def copy(d):
        shutil.copytree(trained_ckpt, d, dirs_exist_ok=True)

    with pytest.raises(KeyboardInterrupt):
        write_atomic_dir(out / "ckpt", copy)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not (out / "ckpt").exists()
    found = resolve(out)
    assert found.name.startswith(".ckpt.old-")
    load_model(out)  # complete and loadable
    write_atomic_dir(
        out / "ckpt",
        lambda d: shutil.copytree(found, d, dirs_exist_ok=True),
        clean_stale=True,
    )
    leftovers = sorted(p.name for p in out.iterdir() if p.name != "ckpt")
    # the marked old copy is gone; the complete unswapped temp copy is kept (no marker)
    assert not any(name.startswith(".ckpt.old-") for name in leftovers)
    assert resolve(out) == out / "ckpt"


def test_legacy_old_folder_is_still_found(tmp_path, trained_ckpt):
    shutil.copytree(trained_ckpt, tmp_path / "ckpt.old")
    assert resolve(tmp_path) == tmp_path / "ckpt.old"


# -- mlxgpt train: where it writes ------------------------------------------------------------
def test_resume_of_a_copy_writes_into_the_copy(capsys, corpus_file, tmp_path, monkeypatch):
    """The original run's out_dir is relative and recorded in the checkpoint; resuming a copy
    from another working folder must leave the original alone."""
    monkeypatch.chdir(tmp_path)
    assert train_cli(capsys, corpus_file, "run", "stop_at=3")[0] == 0
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    original = snapshot(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "copy"), "--no-progress"]) == 0
    capsys.readouterr()
    assert snapshot(tmp_path / "run") == original
    assert list(elsewhere.iterdir()) == []
    state = json.loads((tmp_path / "copy" / "ckpt" / "state.json").read_text())
    assert state["step"] == 6


def test_fresh_train_refuses_an_out_dir_holding_a_run(capsys, corpus_file, tmp_path):
    out = tmp_path / "run"
    assert train_cli(capsys, corpus_file, out)[0] == 0
    before = snapshot(out)
    code, err = train_cli(capsys, corpus_file, out, "seed=2")
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before
    code, err = train_cli(capsys, corpus_file, out, "--overwrite", "seed=2")
    assert code == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one run only


def test_run_killed_before_its_first_checkpoint(capsys, corpus_file, tmp_path):
    """A log without a checkpoint: a fresh run is refused (it would mix two runs' logs)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0}) + "\n")
    code, err = train_cli(capsys, corpus_file, out)
    assert code == 2 and "--overwrite" in err
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert train_cli(capsys, corpus_file, out, "--overwrite")[0] == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] != 4.0


def test_out_dir_that_is_a_file(capsys, corpus_file, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    code, err = train_cli(capsys, corpus_file, path)
    assert code == 2 and err.startswith("error: ") and "not a folder" in err
    assert path.read_text() == "mine"


def test_log_survives_a_failed_rewrite_at_resume(corpus_file, tmp_path, capsys):
    """Resuming rewrites log.jsonl without the lines past the checkpoint. A failure while
    writing (here: the file-size limit, as a full disk) must leave the old log intact."""
    out = tmp_path / "run"
    assert train_cli(capsys, corpus_file, out, "stop_at=3")[0] == 0
    log = out / "log.jsonl"
    with open(log, "a", encoding="utf-8") as f:  # a long history, and lines past step 3
        for step in range(4, 400):
            f.write(json.dumps({"step": step % 3, "loss": 1.0, "pad": "x" * 40}) + "\n")
    before = log.read_bytes()
    limit = len(before) // 2

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    subprocess.run(
        [sys.executable, "-m", "mlxgpt.cli", "train", "--resume", str(out), "--no-progress"],
        preexec_fn=limit_file_size,
        capture_output=True,
        timeout=120,
    )
    assert log.read_bytes() == before  # every line is <= step 3: all are kept


def test_two_runs_into_one_out_dir_at_once(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlxgpt.cli", "train", "--data", str(corpus_file)]
    cmd += ["--out-dir", str(out), "--max-iters", "100000", *TINY, "ckpt_interval=5"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "ckpt" / "state.json").is_file():  # it is training
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for extra in ([], ["--overwrite"]):
            code, err = train_cli(capsys, corpus_file, out, *extra)
            assert code == 2 and "another" in err and str(first.pid) in err
        assert main(["train", "--resume", str(out), "--no-progress"]) == 2
        assert "another" in capsys.readouterr().err
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the OS released the lock when the process died: a later run may take over
    code, err = train_cli(capsys, corpus_file, out, "--overwrite")
    assert code == 0, err


def test_bad_data_writes_nothing(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, err = train_cli(capsys, empty, tmp_path / "out")
    assert code == 2 and "is empty" in err
    assert not (tmp_path / "out").exists()


def test_export_force_replaces_a_folder_exported_before_the_onnx_layout(ckpt, tmp_path):
    out = tmp_path / "old"
    export_checkpoint(ckpt, out, verify=False, quiet=True)
    (out / "onnx" / "model.onnx").rename(out / "model.onnx")  # the layout before onnx/
    (out / "onnx").rmdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "genai_config.json"):
        (out / name).unlink()
    export_checkpoint(ckpt, out, force=True, verify=False, quiet=True)
    assert (out / "onnx" / "model.onnx").is_file() and not (out / "model.onnx").exists()
