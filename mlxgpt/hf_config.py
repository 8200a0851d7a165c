"""A :class:`~mlxgpt.config.GPTConfig` as a Hugging Face GPT-2 ``config.json`` (no MLX, no numpy).

mlxgpt's model is GPT-2 (learned positions, pre-LayerNorm, GELU MLP of width ``4 * n_embd``,
tied LM head), so Hugging Face's ``gpt2`` model type describes it and every client that
reads a Hugging Face ``config.json`` (transformers, Optimum, transformers.js) understands
its shape. Two things GPT-2's config cannot say are carried by mlxgpt's own keys:
``bias = false`` (GPT-2 always has biases) and the exact ``dropout`` placement.

:func:`gpt2_config` is the one mapping; :func:`shape_mismatches` tells whether a
``config.json`` still agrees with the GPTConfig it was written from (someone may have
edited ``n_head`` in one place but not the other).
"""

from __future__ import annotations

from typing import Any

from mlxgpt.config import LAYER_NORM_EPS, GPTConfig

MODEL_TYPE = "gpt2"
# mlxgpt's activation names -> Hugging Face's: "gelu" is the exact (erf) GELU in both;
# GPT-2's tanh approximation is "gelu_new" in transformers.
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def gpt2_config(config: GPTConfig) -> dict[str, Any]:
    """The Hugging Face GPT-2 config keys that describe ``config`` (no token ids)."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.n_embd,
        "activation_function": ACTIVATIONS[config.activation],
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,  # mlxgpt has no dropout on attention weights
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "use_cache": True,
    }


def shape_mismatches(hf: dict[str, Any], config: GPTConfig) -> list[str]:
    """``key: found X, expected Y`` for every shape key of ``hf`` that disagrees with ``config``."""
    expected = gpt2_config(config)
    keys = ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    keys += ("activation_function",)
    return [
        f"{key}: found {hf.get(key)!r}, expected {expected[key]!r}"
        for key in keys
        if hf.get(key) != expected[key]
    ]
