"""mlxgpt: train a GPT with MLX, export it to ONNX, run it anywhere.

Importing the package has one effect: on Linux it arranges for an optimized BLAS to be
loaded into the process just before MLX's ``mlx.core`` is first imported (see
:mod:`mlxgpt.blas`). Processes that never import MLX (the onnxruntime runtime, the
exporter) load nothing and write nothing.
"""

from mlxgpt.blas import install_import_hook

__version__ = "0.1.0"

install_import_hook()
