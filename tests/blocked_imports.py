"""Run a command as if some packages were not installed (for the minimal-install tests).

:func:`blocking_env` writes a ``sitecustomize.py`` that makes importing any of the named
modules (or their submodules) raise ``ModuleNotFoundError`` exactly as a missing package
does, and returns an environment whose ``PYTHONPATH`` loads it at interpreter start, so
it also applies to console scripts such as ``mlxgpt`` and ``mlxgpt-ort``.
"""

from __future__ import annotations

import os
from pathlib import Path

# The packages the full install has and the minimal runtime install
# (`pip install --no-deps . numpy onnxruntime tokenizers`) lacks.
NOT_IN_RUNTIME_INSTALL = ("mlx", "onnx", "safetensors", "tqdm", "matplotlib")

SITECUSTOMIZE = '''
import os, sys

BLOCKED = set(os.environ["MLXGPT_TEST_BLOCKED"].split(","))


class NotInstalled:
    """A meta-path finder that answers like a Python without these packages."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
'''


def blocking_env(folder: Path, modules: tuple[str, ...], **extra: str) -> dict[str, str]:
    """An environment in which importing ``modules`` fails as if they were not installed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "MLXGPT_TEST_BLOCKED": ",".join(modules), **extra}
