"""The checkpoint format, readable with numpy alone (the ONNX exporter uses it without MLX).

A checkpoint is a directory::

    config.json            GPTConfig (model shape)
    model.safetensors      float32 weights, GPT-2 names (wte.weight, h.0.attn.c_attn.weight, ...)
    tokenizer.json         Hugging Face tokenizers file (char or byte-level BPE)
    train_config.json      the TrainConfig of the run        (training checkpoints only)
    optimizer.safetensors  AdamW state                        (training checkpoints only)
    state.json             step, losses, RNG and data-sampler state (training checkpoints only)

Writes are atomic (:func:`write_atomic_dir`): everything goes to a fresh temporary folder
next to ``DIR`` (``.DIR.tmp-XXXXXXXX``, made by ``tempfile.mkdtemp``, so it can never be a
folder of the user's), files are fsynced, then ``DIR`` is renamed to ``.DIR.old-XXXXXXXX``,
the temporary folder to ``DIR``, and the old copy is removed. A crash at any moment leaves
either the old or the new checkpoint complete; :func:`resolve` falls back to the old copy
if the crash hit between the two renames. Only folders this module created are ever removed.

``model.safetensors`` carries a digest of ``config.json`` and the weights in its metadata
(``mlxgpt_digest``); readers recompute it, so a hand-edited config (say ``n_head`` changed
with the weight shapes unchanged) is an error instead of a silently wrong model.
Checkpoints written before the digest existed still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlxgpt.config import ConfigError, GPTConfig, gpt_config_from_dict
from mlxgpt.errors import UserError
from mlxgpt.tokenizer import Tokenizer, TokenizerError

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
TRAINING_FILES = ("train_config.json", "optimizer.safetensors", "state.json")
DIGEST_KEY = "mlxgpt_digest"  # model.safetensors metadata: digest of config.json + weights
TEMP_MARKER = ".mlxgpt-temporary"  # inside a temporary folder of write_atomic_dir
CHECKPOINT_ENTRIES = frozenset(REQUIRED + TRAINING_FILES + (TEMP_MARKER,))


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message says which."""


def resolve(path: str | Path) -> Path:
    """The checkpoint directory for ``path``: the directory itself or its ``ckpt/``."""
    path = Path(path)
    for candidate in (path, path / "ckpt"):
        if not candidate.exists():
            candidate = _interrupted_swap(candidate) or candidate
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


def _siblings(target: Path, kind: str) -> Iterator[Path]:
    """The temporary (``kind="tmp"``) or old (``"old"``) folders write_atomic_dir made for
    ``target``."""
    prefix = f".{target.name}.{kind}-"
    if target.parent.is_dir():
        for entry in target.parent.iterdir():
            if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
                yield entry


def _interrupted_swap(target: Path) -> Path | None:
    """The old copy of ``target`` left by a crash between the two renames, if any.

    ``DIR.old`` is what versions before the unique temporary names left behind."""
    olds = [p for p in _siblings(target, "old") if (p / "config.json").is_file()]
    legacy = Path(f"{target}.old")
    if (legacy / "config.json").is_file():
        olds.append(legacy)
    return max(olds, key=lambda p: p.stat().st_mtime) if olds else None


def is_checkpoint_folder(folder: Path) -> bool:
    """True if ``folder`` is a real folder holding nothing but checkpoint files."""
    return (
        folder.is_dir()
        and not folder.is_symlink()
        and set(os.listdir(folder)) <= CHECKPOINT_ENTRIES
    )


def checkpoint_copies(target: Path) -> list[Path]:
    """``target`` and every folder a write of it may have left beside it (temporary and
    old copies, and the ``DIR.old``/``DIR.tmp`` of earlier versions) that exist."""
    legacy = [Path(f"{target}.old"), Path(f"{target}.tmp")]
    found = [target, *_siblings(target, "tmp"), *_siblings(target, "old"), *legacy]
    return [p for p in found if p.exists() or p.is_symlink()]


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


def weights_digest(config: dict[str, Any], weights: dict[str, np.ndarray]) -> str:
    """SHA-256 of a checkpoint's config.json (as saved) and its weights (names, dtypes,
    shapes, bytes): stored at save time, checked at load time."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8"))
    for name in sorted(weights):
        w = np.ascontiguousarray(weights[name])
        digest.update(f"\0{name}\0{w.dtype.str}\0{w.shape}\0".encode())
        digest.update(w.data)
    return digest.hexdigest()


def read_weights(ckpt: Path, config: GPTConfig) -> dict[str, np.ndarray]:
    """float32 weights as numpy arrays, checked against the config (and its digest)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = ckpt / "model.safetensors"
    try:
        weights = load_file(str(path))
        with safe_open(str(path), "np") as f:
            stored_digest = (f.metadata() or {}).get(DIGEST_KEY)
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
    if stored_digest is not None:
        if weights_digest(read_json(ckpt / "config.json"), weights) != stored_digest:
            raise CheckpointError(
                f"{ckpt}: config.json or model.safetensors was changed after the checkpoint "
                "was saved (their digest does not match): restore the original files "
                "(a config that does not fit the weights gives a wrong model)"
            )
    for name, w in weights.items():
        if not np.all(np.isfinite(w)):
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


def _mark_temporary(folder: Path) -> None:
    (folder / TEMP_MARKER).write_text(
        "a temporary folder of mlxgpt's atomic write; safe to delete\n", encoding="utf-8"
    )


def write_atomic_dir(
    target: str | Path, write: Callable[[Path], None], clean_stale: bool = False
) -> Path:
    """Call ``write(tmp_dir)`` and then atomically put ``tmp_dir`` in ``target``'s place.

    ``tmp_dir`` is a new folder made here (a unique hidden name next to ``target``), so no
    folder of the user's is ever touched: if ``write`` raises, only ``tmp_dir`` is removed
    and ``target`` is untouched. The replaced ``target`` is renamed to a unique old name
    and removed after the swap. ``clean_stale=True`` also removes what a crashed earlier
    write of ``target`` left (only folders carrying this module's marker); pass it only
    while holding the lock of whoever writes ``target`` (a training run's out_dir lock),
    since another process's write in progress looks the same.
    """
    target = Path(os.path.abspath(target))  # "." has no name to put a sibling beside
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(
            f"{target} exists and is not a folder (a file or a link): mlxgpt replaces only "
            "folders it wrote; choose another path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        _mark_temporary(tmp)
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        (tmp / TEMP_MARKER).unlink()
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / tmp.name.replace(".tmp-", ".old-", 1)
        while old.exists():  # a leftover of a crash that drew the same random name
            old = old.with_name(old.name + "x")
        os.replace(target, old)
        _mark_temporary(old)  # a crash from here on: resolve() still finds it
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if clean_stale:
        remove_stale_temporaries(target)
    return target


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporary and old folders a crashed write of ``target`` left behind.

    Only folders with this module's name pattern *and* marker file go, and only while
    ``target`` itself is a complete folder (otherwise an old copy may be the only one)."""
    target = Path(target)
    if not target.is_dir():
        return []
    removed = []
    for kind in ("tmp", "old"):
        for folder in _siblings(target, kind):
            if (folder / TEMP_MARKER).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
