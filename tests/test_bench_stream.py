"""Smoke test of scripts/bench_stream.py (the benchmark itself is never a timed test)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_stream.py"
ROW = re.compile(r"^\| (char|bpe) \| ([\d,]+) \| [\d.]+ ms/token \| [\d.]+ ms/token \| [\d,]+x \|$")


def test_bench_stream_prints_both_decoders_side_by_side(capsys):
    spec = importlib.util.spec_from_file_location("bench_stream", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--sizes", "30", "300", "--tokens", "6", "--rounds", "2", "--chars", "20000"]
    assert bench.main(argv) == 0  # it also checks that both decoders wrote the same text
    rows = [m.groups() for m in map(ROW.match, capsys.readouterr().out.splitlines()) if m]
    assert rows == [("char", "30"), ("char", "300"), ("bpe", "30"), ("bpe", "300")]
