"""The minimal runtime install: what works without MLX & co., and clear errors for the rest.

`pip install --no-deps . numpy onnxruntime tokenizers` gives a machine that runs exported
models. Each test runs a real process in which the packages that install lacks fail to
import exactly as if they were missing (see ``blocked_imports.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from blocked_imports import NOT_IN_RUNTIME_INSTALL, blocking_env

from mlxgpt.sampling import SamplingParams
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import OnnxGPT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(trained_ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minimal") / "exported"
    export_checkpoint(trained_ckpt, out, quiet=True)
    return out


def run_blocked(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        env=blocking_env(tmp_path / "site", NOT_IN_RUNTIME_INSTALL, **env),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "command, package",
    [
        (["generate", "CKPT", "--prompt", "All:"], "mlx"),
        (["export", "CKPT", "OUT"], "onnx"),
        (["train", "--out-dir", "OUT"], "mlx"),
        (["viz", "mask", "--out", "OUT/mask.png"], "mlx"),
    ],
    ids=["generate", "export", "train", "viz"],
)
def test_mlxgpt_commands_name_the_missing_package(trained_ckpt, tmp_path, command, package):
    out = tmp_path / "out"
    argv = [str(trained_ckpt) if a == "CKPT" else a.replace("OUT", str(out)) for a in command]
    result = run_blocked(tmp_path, ["-m", "mlxgpt.cli", *argv])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: `mlxgpt {command[0]}` needs the Python package {package}")
    assert "pip install" in lines[0]
    assert not out.exists()  # nothing written


RUNTIME_SCRIPT = """
import contextlib, io, json, sys
from mlxgpt_export.cli import main
from mlxgpt_export.runtime import OnnxGPT
from mlxgpt.sampling import SamplingParams

folder = sys.argv[1]
model = OnnxGPT.load(folder)
api = "".join(model.generate("All:", 20, SamplingParams(temperature=0.8, seed=7)))
batch = model.generate_batch(["All:", "First"], 6)
with contextlib.redirect_stdout(io.StringIO()) as out:
    rc = main(["generate", folder, "--prompt", "All:", "--max-tokens", "20",
               "--temperature", "0.8", "--seed", "7"])
blocked = ("mlx", "onnx", "safetensors", "tqdm", "matplotlib")
print(json.dumps({
    "api": api, "batch": batch, "cli_rc": rc, "cli_out": out.getvalue(),
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in blocked),
}))
"""


def test_mlxgpt_ort_runs_with_only_the_runtime_packages(exported: Path, tmp_path: Path):
    """mlx, onnx, safetensors, tqdm and matplotlib all missing: mlxgpt-ort still generates."""
    script = textwrap.dedent(RUNTIME_SCRIPT)
    result = run_blocked(tmp_path, ["-c", script, str(exported)])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    model = OnnxGPT.load(exported)
    expected = "".join(model.generate("All:", 20, SamplingParams(temperature=0.8, seed=7)))
    assert len(expected) == 20 and report["api"] == expected
    assert report["batch"] == model.generate_batch(["All:", "First"], 6)
    assert report["cli_rc"] == 0 and report["cli_out"] == "All:" + expected + "\n"
    assert report["loaded"] == []
    console = run_blocked(tmp_path, ["-m", "mlxgpt_export", "generate", str(exported)])
    assert console.returncode == 0, console.stderr  # the folder's defaults: greedy, 200 tokens
    assert console.stdout == "".join(model.generate("", 200)) + "\n"


IMPORT_SCRIPT = """
import json, pathlib, sys
import mlxgpt.sampling, mlxgpt.blas
if sys.argv[1] in ("runtime", "with-mlx"):
    import mlxgpt_export.runtime
if sys.argv[1] == "with-mlx":
    import mlx.core
maps = pathlib.Path("/proc/self/maps")
libs = sorted({line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
              if maps.exists() else [])
print(json.dumps({"status": mlxgpt.blas.status(), "libs": libs,
                  "mlx": sorted(m for m in sys.modules if m.split(".")[0] == "mlx")}))
"""
# onnxruntime itself (not mlxgpt) keeps a telemetry device id under the user's cache
ORT_OWN_FILES = Path(".cache", "Microsoft", "DeveloperTools", ".onnxruntime")


def blas_libraries(libs: list[str]) -> list[str]:
    """Shared libraries mlxgpt.blas may load (numpy's own OpenBLAS copy is not one)."""
    names = ("cmeel", "gfortran", "libopenblas", "mlx")
    return [p for p in libs if "numpy.libs" not in p and any(n in p for n in names)]


def import_report(tmp_path: Path, home: Path, mode: str, blocked: tuple[str, ...]) -> dict:
    home.mkdir()
    env = blocking_env(tmp_path / "site", blocked, HOME=str(home))
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(IMPORT_SCRIPT), mode],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return json.loads(result.stdout)


def files_under(home: Path) -> list[Path]:
    return sorted(p.relative_to(home) for p in home.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["sampling", "runtime"])
def test_importing_the_runtime_loads_no_blas_and_writes_nothing(tmp_path: Path, mode: str):
    """The BLAS hook waits for mlx.core: the runtime never triggers it, nor writes a file."""
    home = tmp_path / "home"
    report = import_report(tmp_path, home, mode, NOT_IN_RUNTIME_INSTALL)
    assert report["status"] == {"library": None, "reason": "not attempted"}
    assert report["mlx"] == [] and blas_libraries(report["libs"]) == []
    written = files_under(home)
    if mode == "runtime":
        written = [p for p in written if not p.is_relative_to(ORT_OWN_FILES)]
    assert written == []


def test_the_blas_check_sees_the_blas_once_mlx_is_imported(tmp_path: Path):
    """The control for the test above: the same probe, with MLX imported, finds the BLAS."""
    report = import_report(tmp_path, tmp_path / "home", "with-mlx", ())
    assert report["mlx"] and "mlx.core" in report["mlx"]
    if sys.platform.startswith("linux"):
        assert report["status"]["reason"] == "loaded" and blas_libraries(report["libs"])
