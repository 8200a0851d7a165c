"""ONNX export of mlxgpt checkpoints and an onnxruntime runtime for them. Never imports MLX.

* :mod:`export.signature`: the graph's input/output names and dimensions, position ids.
* :mod:`export.graph` builds the ONNX graph from numpy weights with ``onnx.helper``; its
  :func:`~export.graph.attention_bias` is the one causal + padding mask.
* :mod:`export.exporter` writes an export folder (``mlxgpt export CKPT OUT_DIR``).
* :mod:`export.parity`: the check at export time against a small numpy forward pass.
* :mod:`export.runtime` loads an export folder into onnxruntime and generates text
  (numpy, onnxruntime and tokenizers only).
* :mod:`export.cli` is the ``mlxgpt-ort`` command (also ``python -m export``).
* :mod:`export.errors`: :class:`~export.errors.ExportError` and its subclasses.
"""
