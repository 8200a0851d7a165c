"""ONNX export of mlxgpt checkpoints and an onnxruntime runtime for them. Never imports MLX.

* :mod:`export.graph` builds the ONNX graph from numpy weights with ``onnx.helper``.
* :mod:`export.exporter` writes an export folder (``mlxgpt export CKPT OUT_DIR``).
* :mod:`export.reference` is a small numpy forward pass the exporter checks the graph against.
* :mod:`export.runtime` loads an export folder into onnxruntime and generates text
  (numpy, onnxruntime and tokenizers only).
* :mod:`export.cli` is the ``mlxgpt-ort`` command (also ``python -m export``).
"""
