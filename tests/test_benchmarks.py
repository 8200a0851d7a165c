"""Smoke tests: each benchmark script runs end to end on a tiny shape and checks itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_parallel  # noqa: E402
import bench_train  # noqa: E402
import profile_train  # noqa: E402

TINY_TRAIN = ["--shapes", "tiny", "--steps", "3", "--warmup", "1", "--rounds", "1"]


@pytest.mark.parametrize("grad", [False, True])
def test_bench_parallel_one_pass_equals_prefixes(tmp_path, grad):
    out = tmp_path / "parallel.json"
    args = ["--lengths", "4", "8", "--batch", "2", "--shape", "1", "2", "16"]
    args += ["--repeats", "1", "--json", str(out)] + (["--grad"] if grad else [])
    result = bench_parallel.main(args)
    assert json.loads(out.read_text()) == result
    assert [r["T"] for r in result["rows"]] == [4, 8]
    for row in result["rows"]:
        assert row["loss_diff"] <= 1e-5 and row["one_pass_ms"] > 0 and row["prefixes_ms"] > 0
        assert ("grad_diff" in row) == grad


def test_bench_parallel_detects_a_leaky_mask(monkeypatch):
    """Without the causal mask the one-pass loss is not the prefixes' loss: it must fail."""
    from mlxgpt import train

    monkeypatch.setattr(train, "loss_fn", lambda m, x, y, mask="none": _leaky(m, x, y))
    with pytest.raises(AssertionError, match="one-pass loss"):
        bench_parallel.main(["--lengths", "8", "--batch", "2", "--shape", "1", "2", "16"])


def _leaky(model, x, y):
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(x, mask="none").astype(mx.float32)
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def test_bench_train_without_pytorch_measures_mlxgpt_alone(tmp_path):
    """PyTorch is optional: hidden from the process, the script says so and still runs."""
    out = tmp_path / "train.json"
    argv = ["bench_train.py", *TINY_TRAIN, "--with-mlx-functions", "--json", str(out)]
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = {argv!r}; "
        f"runpy.run_path({str(SCRIPTS / 'bench_train.py')!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "PyTorch is not installed" in run.stdout
    result = json.loads(out.read_text())
    tiny = result["shapes"]["tiny"]
    assert len(tiny["mlxgpt"]) == 1 and tiny["mlxgpt"][0] > 0 and tiny["torch"] == []
    assert tiny["mlxgpt_mlx_functions"][0] > 0 and tiny["speedup_over_mlx_functions"][0] > 0
    assert "| tiny |" in run.stdout and "MLX's own functions" in run.stdout


def test_bench_train_in_this_environment(tmp_path):
    """With PyTorch installed both run and the PyTorch model is checked to be the same GPT."""
    result = bench_train.run(["tiny"], steps=3, warmup=1, rounds=1)
    tiny = result["shapes"]["tiny"]
    assert tiny["mlxgpt"][0] > 0 and 0 < tiny["mlxgpt_mfu"][0] < 1
    if result["machine"]["torch"] is not None:
        assert tiny["max_logit_diff"] < 1e-4
        assert tiny["torch"][0] > 0 and tiny["ratio"][0] > 0
    else:
        assert tiny["torch"] == []
    assert tiny["flops_per_token"] > 0


def test_profile_train_prints_every_operation(capsys):
    profile_train.main(["--shape", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    for row in ("GELU", "attention core", "layer norm", "cross-entropy", "AdamW", "**sum**"):
        assert f"| {row}" in out
    assert "real compiled step" in out
