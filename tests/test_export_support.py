"""Helpers shared by the export and runtime tests (this module holds no tests).

Random tiny checkpoints are written with numpy alone, in the format of
:mod:`mlxgpt.checkpoint`, with *every* parameter random (biases and LayerNorm weights too,
so they are really exercised) and scaled so logits are O(1) and well separated.
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mlxgpt.checkpoint import expected_shapes, write_atomic_dir, write_json
from mlxgpt.config import GPTConfig
from mlxgpt.tokenizer import Tokenizer

ALPHABET = " \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:!?'-"

# Several shapes: with and without bias, 1-4 layers, odd head sizes (5, 7, 9).
CONFIGS = {
    "bias-1layer-hs8": GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=1, n_embd=8),
    "nobias-2layer-hs5": GPTConfig(
        vocab_size=33, block_size=24, n_layer=2, n_head=3, n_embd=15, bias=False
    ),
    "bias-4layer-hs7-gelutanh": GPTConfig(
        vocab_size=47, block_size=32, n_layer=4, n_head=2, n_embd=14, activation="gelu_tanh"
    ),
    "nobias-3layer-hs9-gelutanh": GPTConfig(
        vocab_size=65,
        block_size=64,
        n_layer=3,
        n_head=4,
        n_embd=36,
        bias=False,
        activation="gelu_tanh",
    ),
}


def char_tokenizer(vocab_size: int) -> Tokenizer:
    """A character tokenizer with exactly ``vocab_size`` tokens (space and newline first)."""
    assert vocab_size <= len(ALPHABET)
    return Tokenizer.train_char([ALPHABET[:vocab_size]])


def random_weights(config: GPTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("bias"):
            w = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 1:  # LayerNorm scale
            w = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name in ("wte.weight", "wpe.weight"):
            w = rng.normal(0.0, 1.0, shape)
        else:  # Linear (out, in): keep activations O(1)
            w = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        weights[name] = w.astype(np.float32)
    return weights


def write_random_checkpoint(directory: Path, config: GPTConfig, seed: int = 0) -> Path:
    """A complete mlxgpt checkpoint with random weights (numpy only, no MLX)."""
    weights, tokenizer = random_weights(config, seed), char_tokenizer(config.vocab_size)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", dataclasses.asdict(config))
        tokenizer.save(tmp / "tokenizer.json")

    return write_atomic_dir(directory, write)


def mlx_model(ckpt: Path):
    """The MLX model and tokenizer of a checkpoint (imports MLX: only call it in tests)."""
    from mlxgpt.model_io import load_model

    model, tokenizer, _ = load_model(ckpt)
    return model, tokenizer


def mlx_logits(model, chunks: list[list[int]]) -> list[np.ndarray]:
    """MLX logits ``(len(chunk), vocab)`` of each chunk, fed one after another with a KV cache."""
    import mlx.core as mx

    from mlxgpt.model import make_cache

    cache = make_cache(model)
    out = []
    for chunk in chunks:
        logits = model(mx.array([chunk], dtype=mx.int32), cache=cache)
        out.append(np.array(logits[0].astype(mx.float32)))
    return out
