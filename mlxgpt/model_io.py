"""Saving and loading MLX models and training state in the :mod:`mlxgpt.checkpoint` format."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import save_file

from mlxgpt import __version__
from mlxgpt.checkpoint import (
    CheckpointError,
    read_config,
    read_json,
    read_tokenizer,
    read_weights,
    resolve,
    write_atomic_dir,
    write_json,
)
from mlxgpt.model import GPT
from mlxgpt.tokenizer import Tokenizer


def save_checkpoint(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    train_config: dict[str, Any] | None = None,
    optimizer: optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically (see :mod:`mlxgpt.checkpoint`)."""
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"mlxgpt": __version__})
        write_json(tmp / "config.json", dataclasses.asdict(model.config))
        tokenizer.save(tmp / "tokenizer.json")
        if train_config is not None:
            write_json(tmp / "train_config.json", train_config)
        if optimizer is not None:
            flat = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), flat)
        if state is not None:
            write_json(tmp / "state.json", state)

    return write_atomic_dir(directory, write)


def load_model(path: str | Path, dtype: mx.Dtype = mx.float32) -> tuple[GPT, Tokenizer, Path]:
    """The model (in eval mode) and tokenizer of a checkpoint, and its resolved directory."""
    ckpt = resolve(path)
    config = read_config(ckpt)
    weights = read_weights(ckpt, config)
    tokenizer = read_tokenizer(ckpt, config)
    model = GPT(config)
    model.update(tree_unflatten([(k, mx.array(v, dtype=dtype)) for k, v in weights.items()]))
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer, ckpt


def load_optimizer_state(ckpt: Path, optimizer: optim.Optimizer) -> None:
    path = ckpt / "optimizer.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no optimizer state: it cannot be resumed")
    try:
        flat = mx.load(str(path))
    except Exception as err:  # MLX raises RuntimeError/ValueError on bad files
        raise CheckpointError(f"{path} is corrupt: {err}") from None
    optimizer.state = tree_unflatten(list(flat.items()))


def load_state(ckpt: Path) -> dict[str, Any]:
    if not (ckpt / "state.json").is_file():
        raise CheckpointError(f"{ckpt} has no state.json: it is not a training checkpoint")
    return read_json(ckpt / "state.json")
