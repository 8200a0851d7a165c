"""ONNX export of mlxgpt checkpoints and an onnxruntime runtime for them. Never imports MLX.

* :mod:`mlxgpt_export.signature`: the graph's input/output names and dimensions, position ids.
* :mod:`mlxgpt_export.graph` builds the ONNX graph from numpy weights with ``onnx.helper``; its
  :func:`~mlxgpt_export.graph.attention_bias` is the one causal + padding mask.
* :mod:`mlxgpt_export.exporter` writes an export folder (``mlxgpt export CKPT OUT_DIR``).
* :mod:`mlxgpt_export.parity`: the check at export time against a small numpy forward pass.
* :mod:`mlxgpt_export.runtime` loads an export folder into onnxruntime and generates text
  (numpy, onnxruntime and tokenizers only).
* :mod:`mlxgpt_export.batching`: continuous batching of many generations over the runtime's
  ``forward`` (each request gets the tokens it gets alone).
* :mod:`mlxgpt_export.server`: the OpenAI-compatible HTTP server (``mlxgpt-ort serve``).
* :mod:`mlxgpt_export.cli` is the ``mlxgpt-ort`` command (also ``python -m mlxgpt_export``).
* :mod:`mlxgpt_export.errors`: :class:`~mlxgpt_export.errors.ExportError` and its subclasses.
"""
