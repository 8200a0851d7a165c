"""On Linux, MLX's matmuls must bind to the optimized BLAS, not the wheel's reference one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the slow reference BLAS exists only in the Linux mlx[cpu] wheel; macOS uses Accelerate",
)

PROGRAM = """
import mlxgpt, mlx.core as mx
a = mx.ones((64, 64)); mx.eval(a @ a)
print(mlxgpt.blas.status())
"""


def _bindings(env_extra: dict[str, str]) -> tuple[str, str]:
    env = {**os.environ, "LD_DEBUG": "bindings", **env_extra}
    res = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True
    )
    lines = [ln for ln in res.stderr.splitlines() if "libmlx" in ln and "`cblas_sgemm'" in ln]
    assert lines, "the dynamic linker never bound MLX's cblas_sgemm"
    return lines[0], res.stdout


def test_mlx_sgemm_binds_to_openblas():
    """The dynamic linker's own record of where MLX's cblas_sgemm went (LD_DEBUG)."""
    binding, status = _bindings({})
    assert "openblas" in binding.split(" to ", 1)[1].lower(), binding
    assert "'reason': 'loaded'" in status


def test_the_check_detects_the_slow_path():
    """With the loader disabled the same check sees the wheel's reference libblas."""
    binding, status = _bindings({"MLXGPT_BLAS": "off"})
    target = binding.split(" to ", 1)[1]
    assert "openblas" not in target.lower() and "libblas" in target
    assert "disabled" in status
