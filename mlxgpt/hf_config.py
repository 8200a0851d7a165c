"""What mlxgpt writes into Hugging Face files: ``config.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``generation_config.json`` (no MLX, no numpy).

Both folders mlxgpt writes for other programs use these functions: the ONNX export folder
(:mod:`mlxgpt_export.exporter`, read by Optimum, transformers.js, onnxruntime-genai) and
the ``mlxgpt export-hf`` folder (:mod:`mlxgpt.hf`, read by transformers).

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

import mlxgpt
from mlxgpt import sampling
from mlxgpt.config import LAYER_NORM_EPS, GPTConfig
from mlxgpt.tokenizer import Tokenizer

MODEL_TYPE = "gpt2"
# mlxgpt's activation names -> Hugging Face's: "gelu" is the exact (erf) GELU in both;
# GPT-2's tanh approximation is "gelu_new" in transformers.
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# ... and back: transformers' names that compute one of mlxgpt's activations.
ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


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
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "use_cache": True,
        "dtype": "float32",
    }


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """``bos``/``eos``/``pad`` ids meaning what they mean in mlxgpt.

    ``bos`` is the token an empty prompt starts from; ``eos`` the one that ends a text:
    ``<|endoftext|>`` for BPE models, none (null) for char models, whose start token (the
    newline) is ordinary text. ``pad`` is ``eos`` (GPT-2's convention; padding is masked).
    """
    return {
        "bos_token_id": tokenizer.start_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.eos_id,
    }


def hf_model_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``config.json`` for transformers' ``GPT2LMHeadModel``: shape plus token ids."""
    return {
        **gpt2_config(config),
        **special_token_ids(tokenizer),
        "mlxgpt_version": mlxgpt.__version__,
    }


def generation_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``generation_config.json``: the library's sampling defaults (:mod:`mlxgpt.sampling`)
    in Hugging Face keys, with the token ids and the context length."""
    return {
        **special_token_ids(tokenizer),
        "context_length": config.block_size,
        **sampling.to_generation_config(sampling.SamplingParams(), sampling.DEFAULT_MAX_TOKENS),
        "prompt_longer_than_context": "keep the last context_length tokens",
        "mlxgpt_version": mlxgpt.__version__,
    }


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str | None]:
    """Special-token strings: ``<|endoftext|>`` for BPE; none for char models (declaring the
    newline special would make ``decode(skip_special_tokens=True)`` delete every newline)."""
    eot = None if tokenizer.eos_id is None else tokenizer.hf.id_to_token(tokenizer.eos_id)
    return {"bos_token": eot, "eos_token": eot, "pad_token": eot, "unk_token": None}


def tokenizer_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json`` for transformers, transformers.js and onnxruntime-genai.

    The generic fast-tokenizer class reads ``tokenizer.json`` as it is (a GPT-2 class would
    impose its own pre-tokenizer on char models); no clean-up of spaces, so decoding gives
    mlxgpt's text; left padding (a batch of prompts continues each at its end); no token
    added to the text (mlxgpt encodes a prompt as it is).
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_tokens(tokenizer),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        "padding_side": "left",
        "truncation_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
    }


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, str]:
    return {k: v for k, v in _special_tokens(tokenizer).items() if v is not None}


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
