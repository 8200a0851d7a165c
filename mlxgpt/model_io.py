"""Saving and loading MLX models and training state in the :mod:`mlxgpt.checkpoint` format.

Everything read back is checked against what this code writes, so a hand-edited or damaged
checkpoint is a :class:`~mlxgpt.checkpoint.CheckpointError` naming the file and the
problem, never a traceback from deep inside MLX or numpy.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import save_file

from mlxgpt import __version__
from mlxgpt.checkpoint import (
    DIGEST_KEY,
    CheckpointError,
    read_config,
    read_json,
    read_tokenizer,
    read_weights,
    resolve,
    weights_digest,
    write_atomic_dir,
    write_json,
)
from mlxgpt.config import GPTConfig
from mlxgpt.model import GPT
from mlxgpt.tokenizer import Tokenizer


def save_checkpoint(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    train_config: dict[str, Any] | None = None,
    optimizer: optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    clean_stale: bool = False,
) -> Path:
    """Write a complete checkpoint atomically (see :mod:`mlxgpt.checkpoint`).

    ``clean_stale``: also remove what a crashed earlier save left (only while holding the
    run's out_dir lock)."""
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    config = dataclasses.asdict(model.config)
    metadata = {"mlxgpt": __version__, DIGEST_KEY: weights_digest(config, weights)}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"), metadata=metadata)
        write_json(tmp / "config.json", config)
        tokenizer.save(tmp / "tokenizer.json")
        if train_config is not None:
            write_json(tmp / "train_config.json", train_config)
        if optimizer is not None:
            flat = dict(tree_flatten(optimizer.state))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), flat)
        if state is not None:
            write_json(tmp / "state.json", state)

    return write_atomic_dir(directory, write, clean_stale=clean_stale)


def model_from_weights(
    config: GPTConfig, weights: dict[str, np.ndarray], dtype: mx.Dtype = mx.float32
) -> GPT:
    """A GPT of shape ``config`` holding ``weights`` (as checked by ``read_weights``)."""
    model = GPT(config)
    model.update(tree_unflatten([(k, mx.array(v, dtype=dtype)) for k, v in weights.items()]))
    mx.eval(model.parameters())
    return model


def load_model(path: str | Path, dtype: mx.Dtype = mx.float32) -> tuple[GPT, Tokenizer, Path]:
    """The model (in eval mode) and tokenizer of a checkpoint, and its resolved directory."""
    ckpt = resolve(path)
    config = read_config(ckpt)
    weights = read_weights(ckpt, config)
    tokenizer = read_tokenizer(ckpt, config)
    model = model_from_weights(config, weights, dtype)
    model.eval()
    return model, tokenizer, ckpt


def load_optimizer_state(ckpt: Path, optimizer: optim.Optimizer) -> None:
    """Restore ``optimizer`` (already initialised for the model) from ``ckpt``: every
    tensor must be there, with the shape the fresh state has, and no other."""
    path = ckpt / "optimizer.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no optimizer state: it cannot be resumed")
    try:
        flat = mx.load(str(path))
    except Exception as err:  # MLX raises RuntimeError/ValueError on bad files
        raise CheckpointError(f"{path} is corrupt: {err}") from None
    fresh = dict(tree_flatten(optimizer.state))
    missing, extra = sorted(set(fresh) - set(flat)), sorted(set(flat) - set(fresh))
    if missing or extra:
        raise CheckpointError(
            f"{path} does not fit this model's optimizer: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for name, value in fresh.items():
        if flat[name].shape != value.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(flat[name].shape)}, "
                f"the model needs {tuple(value.shape)}"
            )
    restored = [(k, flat[k].astype(fresh[k].dtype)) for k in fresh]
    optimizer.state = tree_unflatten(restored)


def load_state(ckpt: Path) -> dict[str, Any]:
    """``state.json``, checked: ``step`` (a whole number >= 0), ``data_rng`` (a dict),
    ``best_val_loss`` (a number, optional)."""
    path = ckpt / "state.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no state.json: it is not a training checkpoint")
    state = read_json(path)
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be a whole number >= 0, got {step!r}")
    if not isinstance(state.get("data_rng"), dict):
        raise CheckpointError(f"{path}: 'data_rng' (the data sampler's state) is missing")
    best = state.get("best_val_loss", math.inf)
    if isinstance(best, bool) or not isinstance(best, (int, float)):
        raise CheckpointError(f"{path}: 'best_val_loss' must be a number, got {best!r}")
    return state
