"""The built wheel: what it holds, what it asks for, and that an installed copy finds its data.

The wheel is built from a copy of the sources (so no ``build/`` folder is left in the
checkout) with the setuptools of the dev install, without downloading anything.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import mlxgpt

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "out",
    "exported",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(REPO, tmp / "src", ignore=SKIP)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr  # e.g. setuptools' package warnings
    (path,) = (tmp / "dist").glob("mlxgpt-*.whl")
    return path


def metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return z.read(name).decode()


def test_wheel_files(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {
        "mlxgpt/corpus/tinyshakespeare.txt",
        "mlxgpt/presets/tiny-char.toml",
        "mlxgpt/presets/shakespeare-char.toml",
        "mlxgpt_export/runtime.py",
        f"mlxgpt-{mlxgpt.__version__}.dist-info/licenses/LICENSE",
    } <= names
    assert not any(n.startswith(("tests/", "scripts/", "data/", "export/")) for n in names)


def test_one_version_and_the_dependency_markers(wheel: Path):
    meta = metadata(wheel).splitlines()
    assert f"Version: {mlxgpt.__version__}" in meta
    assert importlib.metadata.version("mlxgpt") == mlxgpt.__version__  # this install too
    assert "License-Expression: MIT" in meta
    requires = [line.removeprefix("Requires-Dist: ") for line in meta if "Requires-Dist" in line]
    assert 'mlx; sys_platform == "darwin" and platform_machine == "arm64"' in requires
    assert "onnx>=1.18" in requires and "onnxruntime>=1.23" in requires


INSTALLED_SCRIPT = """
import json, os, sys
import mlxgpt
from mlxgpt.config import load_train_config
from mlxgpt.data import Corpus, resolve_data_path

cfg = load_train_config()
print(json.dumps({"mlxgpt": mlxgpt.__file__, "data": cfg.data,
                  "resolved": str(resolve_data_path(cfg.data)),
                  "chars": len("".join(Corpus(cfg.data).pieces()))}))
"""


def test_installed_wheel_finds_the_bundled_corpus_from_any_folder(wheel: Path, tmp_path: Path):
    """Unpacked like pip installs a pure-Python wheel, run from an unrelated folder."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # -S: no .pth files, so this venv's editable install of the checkout stays out of it
    path = f"{site}:{sysconfig.get_paths()['purelib']}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-S", "-c", INSTALLED_SCRIPT],
        env={"PYTHONPATH": path, "MLXGPT_BLAS": "off", "HOME": str(tmp_path)},
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mlxgpt"].startswith(str(site))  # the installed copy, not the checkout
    assert report["data"] == "data/tinyshakespeare.txt"
    assert report["resolved"] == str(site / "mlxgpt" / "corpus" / "tinyshakespeare.txt")
    assert report["chars"] == 1_115_394
