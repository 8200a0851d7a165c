"""mlxgpt: train a GPT with MLX, export it to ONNX, run it anywhere.

Importing the package loads an optimized BLAS for MLX's CPU backend on Linux
(see :mod:`mlxgpt.blas`); it does not import MLX itself, so the numpy-only parts
(``mlxgpt.sampling``, ``mlxgpt.tokenizer``) work where MLX is not installed.
"""

from mlxgpt.blas import ensure_fast_blas

__version__ = "0.1.0"

ensure_fast_blas()
