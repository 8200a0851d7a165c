"""The checkpoint format, readable with numpy alone (the ONNX exporter uses it without MLX).

A checkpoint is a directory::

    config.json            GPTConfig (model shape)
    model.safetensors      float32 weights, GPT-2 names (wte.weight, h.0.attn.c_attn.weight, ...)
    tokenizer.json         Hugging Face tokenizers file (char or byte-level BPE)
    train_config.json      the TrainConfig of the run        (training checkpoints only)
    optimizer.safetensors  AdamW state                        (training checkpoints only)
    state.json             step, losses, RNG and data-sampler state (training checkpoints only)

Writes are atomic: everything goes to ``DIR.tmp`` first, files are fsynced, then the old
directory is renamed to ``DIR.old``, ``DIR.tmp`` to ``DIR``, and ``DIR.old`` is removed.
A crash at any moment leaves either the old or the new checkpoint complete; :func:`resolve`
falls back to ``DIR.old`` if the crash hit between the two renames.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlxgpt.config import ConfigError, GPTConfig, gpt_config_from_dict
from mlxgpt.errors import UserError
from mlxgpt.tokenizer import Tokenizer, TokenizerError

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message says which."""


def resolve(path: str | Path) -> Path:
    """The checkpoint directory for ``path``: the directory itself or its ``ckpt/``."""
    path = Path(path)
    for candidate in (path, path / "ckpt"):
        if not candidate.exists() and Path(f"{candidate}.old").is_dir():
            candidate = Path(f"{candidate}.old")  # a crash between the two renames
        if (candidate / "config.json").is_file():
            missing = [f for f in REQUIRED if not (candidate / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"checkpoint {candidate} is incomplete: missing {', '.join(missing)}"
                )
            return candidate
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Pass the out_dir of a training run "
            "(e.g. out/tiny-char) or its ckpt/ folder; train one with `mlxgpt train`."
        )
    raise CheckpointError(
        f"{path} is not an mlxgpt checkpoint: expected {', '.join(REQUIRED)} in it "
        "or in its ckpt/ folder"
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt or unreadable: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return data


def read_config(ckpt: Path) -> GPTConfig:
    try:
        return gpt_config_from_dict(read_json(ckpt / "config.json"))
    except ConfigError as err:
        raise CheckpointError(f"{ckpt / 'config.json'} is invalid: {err}") from None


def read_tokenizer(ckpt: Path, config: GPTConfig) -> Tokenizer:
    """The checkpoint's tokenizer, checked against the config's vocab_size."""
    try:
        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens, config.json says "
            f"vocab_size={config.vocab_size}"
        )
    return tokenizer


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model and its shape: the contract between writer and readers."""
    C = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, C),
        "wpe.weight": (config.block_size, C),
        "ln_f.weight": (C,),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (C,),
                p + "attn.c_attn.weight": (3 * C, C),
                p + "attn.c_proj.weight": (C, C),
                p + "ln_2.weight": (C,),
                p + "mlp.c_fc.weight": (4 * C, C),
                p + "mlp.c_proj.weight": (C, 4 * C),
            }
        )
        if config.bias:
            shapes.update(
                {
                    p + "ln_1.bias": (C,),
                    p + "attn.c_attn.bias": (3 * C,),
                    p + "attn.c_proj.bias": (C,),
                    p + "ln_2.bias": (C,),
                    p + "mlp.c_fc.bias": (4 * C,),
                    p + "mlp.c_proj.bias": (C,),
                }
            )
    if config.bias:
        shapes["ln_f.bias"] = (C,)
    return shapes


def read_weights(ckpt: Path, config: GPTConfig) -> dict[str, np.ndarray]:
    """float32 weights as numpy arrays, checked against the config."""
    from safetensors.numpy import load_file

    path = ckpt / "model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is corrupt or truncated: {err}") from None
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path} does not match config.json: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {weights[name].shape}, config.json implies {shape}"
            )
        if not np.all(np.isfinite(weights[name])):
            raise CheckpointError(f"{path}: {name} contains NaN or inf")
    return {k: v.astype(np.float32, copy=False) for k, v in weights.items()}  # no 2nd copy


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and then atomically put ``tmp_dir`` in ``target``'s place.

    If ``write`` raises, the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = Path(f"{target}.tmp"), Path(f"{target}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
