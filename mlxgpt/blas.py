"""Give MLX's CPU backend a fast BLAS on Linux.

The ``mlx[cpu]`` wheel links netlib's reference BLAS, which runs a float32 matmul ~35x
slower than OpenBLAS. MLX calls ``cblas_sgemm`` through the dynamic linker, so loading an
optimized CBLAS into the process with global symbol binding *before* MLX's shared library
is loaded makes MLX's calls resolve to it. This module does exactly that, once, at the
moment ``mlx.core`` is first imported in a process that imported ``mlxgpt``:
``import mlxgpt`` only installs an import hook (:func:`install_import_hook`), so processes
that never touch MLX (the onnxruntime runtime, the exporter) load no BLAS, write nothing
to ``~/.cache`` and print no warning. Nothing is changed on disk except a small cached
copy described below.

Where the library comes from (first that loads wins):

1. ``MLXGPT_BLAS=/path/to/libcblas.so`` — your own choice; ``MLXGPT_BLAS=off`` disables
   the whole mechanism.
2. A system OpenBLAS (e.g. Debian/Ubuntu ``libopenblas0-pthread``).
3. The OpenBLAS from the ``cmeel-openblas`` wheel, a dependency of mlxgpt on Linux. It
   needs ``libgfortran.so.5``; where the system has none, the Fortran runtime bundled in
   the MLX wheel itself is used: a copy whose ELF ``SONAME`` reads ``libgfortran.so.5`` is
   written to ``~/.cache/mlxgpt/blas/`` and loaded first.

On macOS MLX uses Accelerate and nothing is done. ``status()`` reports what happened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.abc
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_status: dict[str, str | None] = {"library": None, "reason": "not attempted"}
_handles: list[ctypes.CDLL] = []  # keep loaded libraries alive


def status() -> dict[str, str | None]:
    """Which CBLAS was loaded ahead of MLX (``library``), or why none was (``reason``)."""
    return dict(_status)


def _find_on_path(relative: str) -> Path | None:
    """The first ``sys.path`` entry (e.g. site-packages) that contains ``relative``.

    Searching ``sys.path`` rather than ``mlx.__path__`` matters: ``mlx`` is a namespace
    package, so any folder called ``mlx`` in the working directory joins its path.
    """
    for entry in sys.path:
        candidate = Path(entry or ".") / relative
        if candidate.exists():
            return candidate
    return None


def _load_global(path: str | os.PathLike) -> ctypes.CDLL:
    handle = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
    _handles.append(handle)
    return handle


def _fortran_runtime_from_mlx() -> None:
    """Load MLX's bundled libgfortran under the name OpenBLAS asks for (libgfortran.so.5)."""
    libs = _find_on_path("mlx_cpu.libs")
    if libs is None:
        raise OSError("the mlx-cpu wheel's bundled libraries were not found")
    gfortran = sorted(libs.glob("libgfortran-*.so*"))
    quadmath = sorted(libs.glob("libquadmath-*.so*"))
    if not gfortran:
        raise OSError("no Fortran runtime found in the mlx-cpu wheel")
    for lib in quadmath:  # libgfortran's own dependency, found by its (mangled) SONAME
        _load_global(lib)
    wanted = b"libgfortran.so.5\0"
    old = gfortran[0].name.encode() + b"\0"
    data = gfortran[0].read_bytes()
    if data.count(old) != 1 or len(wanted) > len(old):
        raise OSError("unexpected layout of the Fortran runtime in the mlx-cpu wheel")
    target = _write_cached(
        f"libgfortran.so.5-{len(data)}", data.replace(old, wanted.ljust(len(old), b"\0"))
    )
    _load_global(target)


def _write_cached(name: str, data: bytes) -> Path:
    """``data`` as file ``name`` in the user's cache (or, if read-only, the temp folder)."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    errors = []
    for folder in (user_cache / "mlxgpt" / "blas", Path(tempfile.gettempdir()) / "mlxgpt-blas"):
        target = folder / name
        if target.is_file() and target.stat().st_size == len(data):
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{name}.tmp{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, target)  # atomic: a concurrent process never sees half a file
            return target
        except OSError as err:
            errors.append(f"{folder}: {err}")
    raise OSError(f"cannot write the Fortran runtime copy: {errors}")


def _try_cmeel() -> str:
    lib = _find_on_path("cmeel.prefix/lib/libopenblas.so.0")
    if lib is None:
        raise OSError("cmeel-openblas is not installed")
    try:
        _load_global(lib)
    except OSError as err:
        if "libgfortran" not in str(err):
            raise
        _fortran_runtime_from_mlx()
        _load_global(lib)
    return str(lib)


def _candidates() -> list[str]:
    found = [p for p in _SYSTEM_CANDIDATES if os.path.exists(p)]
    name = ctypes.util.find_library("openblas")
    if name:
        found.append(name)
    return found


class _BlasBeforeMLX(importlib.abc.MetaPathFinder):
    """An import hook that loads the BLAS just before ``mlx.core``, then steps aside.

    It finds nothing itself (``find_spec`` returns ``None``), so the normal finders still
    import MLX; it only runs :func:`ensure_fast_blas` first, which must happen before
    ``mlx.core``'s shared library is loaded to have any effect.
    """

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 (importlib API)
        if fullname == "mlx.core":
            uninstall_import_hook()
            ensure_fast_blas()
        return None


_HOOK = _BlasBeforeMLX()


def install_import_hook() -> None:
    """Load the fast BLAS when ``mlx.core`` is first imported (now, if it already was)."""
    if "mlx.core" in sys.modules:
        ensure_fast_blas()  # too late to help; it says so in a warning
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_import_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def ensure_fast_blas() -> dict[str, str | None]:
    """Load an optimized CBLAS before MLX is imported (Linux only); never raises."""
    if _status["reason"] != "not attempted":
        return status()
    try:
        return _ensure_fast_blas()
    except Exception as err:  # an import-time helper must never break `import mlxgpt`
        _status["reason"] = f"failed: {err}"
        return status()


def _ensure_fast_blas() -> dict[str, str | None]:
    choice = os.environ.get("MLXGPT_BLAS", "").strip()
    if not sys.platform.startswith("linux"):
        _status["reason"] = "not Linux: MLX uses the platform's BLAS"
        return status()
    if choice.lower() in {"off", "0", "none", "false"}:
        _status["reason"] = "disabled by MLXGPT_BLAS"
        return status()
    if importlib.util.find_spec("mlx") is None:
        _status["reason"] = "MLX is not installed"
        return status()
    if "mlx.core" in sys.modules:
        _status["reason"] = "mlx.core was imported before mlxgpt: too late to replace its BLAS"
        warnings.warn(
            "mlxgpt: import mlxgpt before mlx.core, otherwise MLX keeps its slow reference "
            "BLAS on Linux (matmuls ~35x slower).",
            stacklevel=4,
        )
        return status()
    errors = []
    attempts = [choice] if choice else []
    for path in attempts + _candidates():
        try:
            _load_global(path)
            _status.update(library=path, reason="loaded")
            return status()
        except OSError as err:
            errors.append(f"{path}: {err}")
    try:
        _status.update(library=_try_cmeel(), reason="loaded")
        return status()
    except OSError as err:
        errors.append(f"cmeel-openblas: {err}")
    _status["reason"] = "; ".join(errors)
    warnings.warn(
        "mlxgpt: no optimized BLAS could be loaded, MLX matmuls will be ~35x slower on this "
        "CPU. Install OpenBLAS (`pip install cmeel-openblas` or `apt-get install "
        f"libopenblas0-pthread`) or set MLXGPT_BLAS=/path/to/libcblas.so. Details: {errors}",
        stacklevel=3,
    )
    return status()
