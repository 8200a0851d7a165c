"""Smoke test of scripts/bench_infer.py on a tiny shape (the benchmark is never a timed test)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

from mlxgpt_export.exporter import export_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_infer.py"
_spec = importlib.util.spec_from_file_location("bench_infer", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = ["--preset", "tiny-char", "--set", "block_size=32", "n_layer=1", "n_embd=32", "n_head=2"]
FLOAT32 = [
    "mlxgpt-ort portable float32",
    "mlxgpt-ort portable float32 concat cache",  # the exported graph, as genai decodes it
    "mlxgpt-ort fused float32",
    "genai portable float32",
    "genai fused float32",
    "MLX",
    "transformers (PyTorch)",
]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "infer.json"
    argv = [*TINY, "--prompt", "8", "--new", "6", "--rounds", "2", "--batch", "1", "2"]
    argv += ["--context", "--context-new", "4", "--session-options", "--binding", "--no-memory"]
    argv += ["--lockstep", "2"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = bench.main([*argv, "--json", str(out)])
    result["printed"] = printed.getvalue()
    assert json.loads(out.read_text())["main"]["rows"] == json.loads(
        json.dumps(result["main"]["rows"])
    )
    return result


def test_every_contender_runs_both_batches_and_agrees_with_mlxgpt_ort(result: dict):
    rows = {(r["contender"], r["batch"]): r for r in result["main"]["rows"]}
    for name in FLOAT32:
        for batch in (1, 2):
            row = rows[name, batch]
            assert row["tokens_per_s"] > 0 and row["first_ms"] > 0
            assert row["agreement"] == 1.0, (name, batch)  # greedy: the same tokens
            if not name.startswith("genai"):  # genai exposes no logits here
                assert row["max_logit_diff"] < 1e-4
    for name in ("mlxgpt-ort portable float32 no cache", "MLX no cache"):
        assert rows[name, 1]["agreement"] == 1.0 and (name, 2) not in rows
    # int8 / float16: measured when `mlxgpt export` offers them, else said to be missing
    measured = {name for name, _ in rows}
    for precision in ("int8", "float16"):
        name = f"mlxgpt-ort portable {precision}"
        assert (name in measured) != (name in result["main"]["not_available"])
    exports = {(r["export"], r["batch"]) for r in result["main"]["versus_genai"]}
    assert {("portable float32", 1), ("fused float32", 2)} <= exports


def test_machine_and_the_other_sections_are_recorded(result: dict):
    machine = result["machine"]
    assert machine["cores"] >= 1 and len(machine["load_average_end"]) == 3
    assert "onnxruntime" in machine["versions"]
    speedups = [r.get("cache_speedup") for r in result["context"]["rows"]]
    assert sum(s is not None and s > 0 for s in speedups) == 2  # mlxgpt-ort and MLX
    options = {r["contender"] for r in result["session_options"]["rows"]}
    assert options == set(bench.SESSION_OPTIONS)
    assert len(result["binding"]["rows"]) == 4 * 2
    out = result["printed"]
    assert "| mlxgpt-ort portable float32 | 1 |" in out and "cores" in out
    assert "| IO binding, OrtValues | 2 |" in out and "KV cache speed-up" in out
    lockstep = {(r["export"], r["batch"]): r for r in result["lockstep"]["rows"]}
    assert {("portable float32", 1), ("fused float32", 2)} <= set(lockstep)
    for row in lockstep.values():
        assert row["rounds"] == 2 and 0 <= row["ahead"] <= 2
        assert 0 < row["range"][0] <= row["ratio"] <= row["range"][1]
    assert "in lockstep" in out


def test_lockstep_alternates_steps_and_times_each_generation_apart():
    """Each generation's step time is its own: a slow step is charged to the generation that
    took it, both run to their end, and the shorter one stops first."""
    order = []

    def gen(name: str, n: int, pause: float):
        for i in range(n):
            order.append(name)
            bench.time.sleep(pause)
            yield [i]

    slow, fast = bench.lockstep(gen("a", 3, 0.02), gen("b", 5, 0.0))
    assert order == ["a", "b", "a", "b", "a", "b", "b", "b"]
    assert len(slow) == 3 and len(fast) == 5
    assert min(slow) >= 0.02 > max(fast)


def test_memory_probe_measures_a_fresh_process(trained_ckpt: Path, tmp_path: Path):
    folder = export_checkpoint(trained_ckpt, tmp_path / "export", quiet=True)
    spec = {"kind": "ort", "name": "mlxgpt-ort", "folder": str(folder)}
    config = bench.read_config(trained_ckpt)
    memory = bench.peak_memory(spec, 2, 8, 4, config)
    assert memory["peak_mib"] > memory["growth_mib"] > 0, memory


@pytest.mark.parametrize("graph", ["in-place", "exported"])
def test_profile_infer_counts_the_operators_of_each_graph(graph: str, tmp_path: Path):
    """scripts/profile_infer.py on a tiny shape: every decode step's operators are counted
    (the in-place graph's one attention node a layer against the exported graph's Concat of
    the cache), and the kernel time fits inside onnxruntime's time for the step."""
    sys.path.insert(0, str(SCRIPT.parent))
    import profile_infer

    out = tmp_path / "profile.json"
    argv = ["--set", "block_size=32", "n_layer=2", "n_embd=32", "n_head=2", "--prompt", "6"]
    argv += ["--new", "4", "--graph", graph, "--precision", "portable float32", "int8"]
    with contextlib.redirect_stdout(io.StringIO()):
        result = profile_infer.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text())["exports"] == json.loads(json.dumps(result["exports"]))
    assert set(result["exports"]) == {"portable float32", "portable int8"}
    for export in result["exports"].values():
        nodes = {row["op"]: row["nodes"] for row in export["rows"]}
        assert export["steps"] == 3  # 4 new tokens: the prompt's run, then 3 decode steps
        assert 0 < export["kernel_us"] <= export["run_us"]
        if graph == "in-place":
            assert nodes["GroupQueryAttention"] == 2 and "Concat" not in nodes
        else:
            assert nodes["Concat"] == 2 * 2 and "GroupQueryAttention" not in nodes
