"""Smoke test of scripts/bench_serve.py: a few requests, both servers, a complete table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_serve_smoke():
    result = subprocess.run(
        [sys.executable, "scripts/bench_serve.py", "--clients", "1,3", "--requests", "6",
         "--max-tokens", "4", "--rounds", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == 1 + 2 * 2  # header + (1 and 3 clients) x (batched, unbatched)
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-2:] == ["0", "0"]  # no errors, no lost requests
    assert "3 clients: batched/unbatched tokens/s" in result.stdout
    assert "targets: all met" in result.stdout
