"""The inputs and outputs of an exported model: names, symbolic dimensions, position ids.

The names are the ones Hugging Face Optimum, transformers.js and onnxruntime-genai use for
decoder models, so their generation loops can drive the graph. This module is numpy only:
the graph builder (:mod:`mlxgpt_export.graph`, needs ``onnx``) and the runtime
(:mod:`mlxgpt_export.runtime`, needs ``onnxruntime`` but not ``onnx``) both read it.

* ``input_ids``: int64 ``(batch_size, sequence_length)``, the new tokens of this call;
* ``attention_mask``: int64 ``(batch_size, total_sequence_length)``, past + new tokens,
  1 = real token, 0 = padding;
* ``position_ids``: int64 ``(batch_size, sequence_length)``;
* ``past_key_values.{i}.key`` / ``.value``: float32
  ``(batch_size, n_head, past_sequence_length, head_size)`` for every layer ``i``;
* outputs ``logits``: float32 ``(batch_size, sequence_length, vocab_size)`` and
  ``present.{i}.key`` / ``.value``: float32
  ``(batch_size, n_head, total_sequence_length, head_size)``.

The first step passes pasts of length 0; every later step passes the previous step's
``present.*`` as ``past_key_values.*``.
"""

from __future__ import annotations

import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def input_names(n_layer: int) -> list[str]:
    names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    for i in range(n_layer):
        names.extend(past_names(i))
    return names


def output_names(n_layer: int) -> list[str]:
    names = [LOGITS]
    for i in range(n_layer):
        names.extend(present_names(i))
    return names


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Absolute positions for a (left-)padded batch: ``cumsum(mask) - 1``, 0 at padding.

    The Hugging Face convention: a row's first real token is position 0 wherever its
    padding ends, so a left-padded prompt sees the same positions as when run alone.
    Returns int64 of the mask's shape ``(batch, total_sequence_length)``; a step passes
    its last ``sequence_length`` columns.
    """
    mask = np.asarray(attention_mask, dtype=np.int64) != 0
    return np.where(mask, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)
