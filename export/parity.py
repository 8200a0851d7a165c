"""The parity check of every export (numpy + onnxruntime, no MLX): a failure writes nothing.

The exported graph is compared with :func:`reference_logits`, a plain numpy (float64)
forward pass of the same model written from the checkpoint's float32 weights, whatever the
export's precision (float16 and int8 exports are measured against the model as trained,
with a bound that depends on the precision: :func:`tolerance`). The exporter must
work without MLX, so it cannot ask MLX; the test suite closes the loop by checking this
reference and the exported graph against MLX itself (``tests/test_export_parity.py``).

Four situations are measured, as the largest absolute logit difference:

* ``prompt``: a whole prompt, empty past;
* ``decode_step``: one token after a past of all but the last token;
* ``chunk_after_past``: several tokens after an existing past;
* ``left_padded_batch``: a batch of a full row, a left-padded shorter row (compared on
  its real positions with that prompt run alone) and a row whose attention_mask is all
  zeros, which must produce no NaN or inf anywhere (logits and every layer's present).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlxgpt.config import LAYER_NORM_EPS, GPTConfig
from mlxgpt_export import signature as sig
from mlxgpt_export.runtime import OnnxGPT

# The export fails above these differences: sanity bounds that catch a wrong graph, not
# precision claims (the tests hold each precision to tighter measured bounds).
# float32: absolute (float32 graphs typically agree to ~1e-6; the tests require 1e-4).
TOLERANCE = 1e-3
# Lossy precisions: a fraction of the largest |logit| of the reference (at least 1), since
# their error grows with the logits' scale. A wrong graph is off by about the scale itself.
RELATIVE_TOLERANCES = {"float16": 1e-2, "int8": 0.1}
DIFF_KEYS = ("prompt", "decode_step", "chunk_after_past", "left_padded_batch")


def tolerance(precision: str, max_abs_logit: float) -> float:
    """The largest |logit difference| the export of ``precision`` may show (see above)."""
    if precision == "float32":
        return TOLERANCE
    return RELATIVE_TOLERANCES[precision] * max(1.0, max_abs_logit)


# The reference reads the float32 weights as they are and computes in float64: every
# product of a float64 activation and a float32 weight is exact in float64, and no float64
# copy of the whole model is ever made (a 124M-parameter model would need 1 GB for it).
def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * w[f"{name}.weight"].astype(np.float64)
    return y + w[f"{name}.bias"].astype(np.float64) if f"{name}.bias" in w else y


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ w[f"{name}.weight"].T.astype(np.float64)
    return y + w[f"{name}.bias"].astype(np.float64) if f"{name}.bias" in w else y


def _gelu(x: np.ndarray, activation: str) -> np.ndarray:
    """GELU in float64: exact (``"gelu"``) or GPT-2's tanh approximation (``"gelu_tanh"``)."""
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def reference_logits(
    weights: dict[str, np.ndarray],
    config: GPTConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """float64 logits ``(batch, T, vocab)`` of the whole sequences, no cache.

    Padding is masked and positions come from the mask, as in the graph; a masked score is
    *replaced* by the most negative float64 (not added), so padding rows stay finite.
    """
    w = weights
    ids = np.asarray(input_ids)
    B, T = ids.shape
    mask = np.ones((B, T), np.int64) if attention_mask is None else attention_mask
    H, hs = config.n_head, config.head_size
    visible = np.tril(np.ones((T, T), bool))[None, None] & (mask[:, None, None, :] != 0)
    positions = sig.position_ids_from_mask(mask)
    x = w["wte.weight"][ids].astype(np.float64) + w["wpe.weight"][positions].astype(np.float64)
    for i in range(config.n_layer):
        p = f"h.{i}"
        qkv = _linear(_layer_norm(x, w, f"{p}.ln_1"), w, f"{p}.attn.c_attn")
        q, k, v = (t.reshape(B, T, H, hs).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, -1))
        scores = np.where(
            visible, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs), np.finfo(np.float64).min
        )
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, config.n_embd)
        x = x + _linear(y, w, f"{p}.attn.c_proj")
        h = _gelu(_linear(_layer_norm(x, w, f"{p}.ln_2"), w, f"{p}.mlp.c_fc"), config.activation)
        x = x + _linear(h, w, f"{p}.mlp.c_proj")
    return _head(_layer_norm(x, w, "ln_f"), w["wte.weight"])


def _head(x: np.ndarray, wte: np.ndarray, rows: int = 4096) -> np.ndarray:
    """``x @ wte^T`` in float64, ``rows`` vocabulary rows at a time (GPT-2's 50257 x 768
    embedding would otherwise need a 309 MB float64 copy)."""
    chunks = [x @ wte[i : i + rows].T.astype(np.float64) for i in range(0, len(wte), rows)]
    return np.concatenate(chunks, axis=-1)


@dataclass(frozen=True)
class Reference:
    """The parity inputs and their reference logits, computed before any onnxruntime session.

    ``ids`` ``(1, T)`` random tokens; ``logits`` their float64 logits; ``short`` the logits
    of the left-padded batch row (``ids`` rolled by one, its first ``pad`` tokens masked)
    run alone. Computing these first lets the exporter drop the checkpoint's weights before
    onnxruntime loads the model, so the two are never in memory together.
    """

    ids: np.ndarray
    logits: np.ndarray
    short: np.ndarray
    pad: int


def reference(weights: dict[str, np.ndarray], config: GPTConfig, seed: int = 0) -> Reference:
    """The :class:`Reference` of the checkpoint's float32 ``weights`` (the model as trained)."""
    T = min(config.block_size, 12)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (1, T))
    pad = T // 3
    short = reference_logits(weights, config, np.roll(ids, 1)[:, pad:])
    return Reference(ids, reference_logits(weights, config, ids), short, pad)


def measure_parity(
    model: OnnxGPT, ref: Reference | dict[str, np.ndarray], precision: str = "float32"
) -> dict[str, Any]:
    """Largest |ORT - numpy reference| logit difference in each situation (module docstring).

    ``ref``: a :class:`Reference`, or the checkpoint's float32 weights to compute one from,
    whatever the export's ``precision``, which sets the bound (:func:`tolerance`).
    """
    if not isinstance(ref, Reference):
        ref = reference(ref, model.config)
    ids, expected, pad = ref.ids, ref.logits, ref.pad
    T = ids.shape[1]

    def diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(a.astype(np.float64) - b)))

    figures: dict[str, Any] = {"reference": "numpy float64", "sequence_length": T}
    logits, _ = model.forward(ids)
    figures["prompt"] = diff(logits, expected)
    if T >= 2:
        _, past = model.forward(ids[:, :-1])
        logits, _ = model.forward(ids[:, -1:], past=past)
        figures["decode_step"] = diff(logits[:, -1], expected[:, -1])
        split = T // 2
        _, past = model.forward(ids[:, :split])
        logits, _ = model.forward(ids[:, split:], past=past)
        figures["chunk_after_past"] = diff(logits, expected[:, split:])

    batch = np.vstack([ids, np.roll(ids, 1), ids])
    mask = np.ones((3, T), np.int64)
    mask[1, :pad] = 0
    mask[2, :] = 0
    logits, present = model.forward(batch, mask)
    figures["left_padded_batch"] = max(
        diff(logits[0], expected[0]), diff(logits[1, pad:], ref.short[0])
    )
    tensors = [logits] + [t for kv in present for t in kv]
    figures["fully_padded_row_finite"] = bool(all(np.isfinite(t).all() for t in tensors))
    figures["max_abs_logit"] = float(np.max(np.abs(expected)))
    diffs = [v for k, v in figures.items() if k in DIFF_KEYS]
    figures["max_abs_diff"] = float(np.max(diffs))  # NaN if any is NaN (Python's max drops it)
    figures["precision"] = precision
    figures["tolerance"] = bound = tolerance(precision, figures["max_abs_logit"])
    figures["passed"] = figures["max_abs_diff"] <= bound and figures["fully_padded_row_finite"]
    return figures
