"""Smoke tests of the precision and export-memory benchmarks (tiny shapes, seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import CORPUS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_export_memory  # noqa: E402
import bench_precision  # noqa: E402


def test_bench_precision_smoke(tmp_path: Path, capsys):
    out = tmp_path / "precision.json"
    argv = ["--tokens", "8", "--speed-tokens", "4", "--rounds", "1", "--json", str(out)]
    rows = bench_precision.main(argv)
    assert [r["precision"] for r in rows] == list(bench_precision.VARIANTS)
    float32, int8, _, float16 = rows
    assert float32["agreement"] == 1.0 and float32["max_logit_diff"] == 0
    assert float32["decode_vs_float32"] == float32["step_speedup"] == 1.0
    assert 0 < int8["max_logit_diff"] and 0 < float16["max_logit_diff"] < int8["max_logit_diff"]
    assert int8["onnx_mb"] < float16["onnx_mb"] < float32["onnx_mb"]
    assert all(r["decode_tok_s"] > 0 and r["step_ms"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
    assert "| int8, head float32 |" in capsys.readouterr().out


def test_bench_export_memory_smoke(tmp_path: Path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    train = [f"data={corpus}", "batch_size=2", "model.n_layer=1", "model.n_embd=16"]
    train += ["model.n_head=2", "model.block_size=16", "sample_tokens=0"]
    argv = ["--shape", "tiny", "--exports", "float32", "int8+external", "--train-steps", "2"]
    report = bench_export_memory.main(
        [*argv, "--train-args", *train, "--json", str(tmp_path / "m")]
    )
    assert [r["precision"] for r in report["export"]] == ["float32", "int8+external"]
    for row in report["export"]:  # a real process's peak: above the imports alone
        assert row["peak_rss"] > report["baseline_rss"] > 10 * 2**20 and row["onnx_bytes"] > 0
    assert report["train"]["peak_rss"] > 10 * 2**20 and report["train"]["steps"] == 2
    assert json.loads((tmp_path / "m").read_text()) == report
    assert "| int8+external |" in capsys.readouterr().out
