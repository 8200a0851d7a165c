"""Hugging Face GPT-2 checkpoints in and out: ``mlxgpt import-hf`` and ``mlxgpt export-hf``.

mlxgpt's model *is* GPT-2 (pre-LayerNorm blocks, learned positions, LayerNorm eps 1e-5,
head tied to the token embedding), so converting is renaming and transposing, never
approximating. The differences between the two files, and nothing else:

* **Names.** ``save_pretrained`` of ``GPT2LMHeadModel`` writes ``transformer.h.0...``;
  the original hub files (``gpt2``, ``distilgpt2``) write bare ``h.0...``. mlxgpt's names
  are the bare ones. Both layouts are read; ``transformer.`` is written.
* **Linear weights.** GPT-2's Conv1D stores ``(in, out)``; mlxgpt (like ``nn.Linear``)
  stores ``(out, in)``: the four block matrices are transposed on the way in and out.
* **Head.** mlxgpt's head is the token embedding. A file's ``lm_head.weight`` is accepted
  only when it equals ``wte``; a different (untied) head cannot be represented.
* **Buffers.** Older files hold ``h.N.attn.bias`` (the causal mask) and
  ``h.N.attn.masked_bias`` (its fill value): constants, not weights; dropped.
* **Biases.** mlxgpt models trained with ``bias=False`` are written with zero biases,
  which compute exactly the same function.

A Hugging Face ``config.json`` is refused when it asks for something mlxgpt computes
differently (another activation or LayerNorm epsilon, a non-4x MLP, attention scaled by
layer index or not scaled at all, cross-attention); the message names each setting.
``reorder_and_upcast_attn`` is accepted: it only reorders float32 operations (scale
before the product) and upcasts half precision, which mlxgpt's float32 weights never are.

This module needs numpy, safetensors and tokenizers only (no MLX, no torch). The contents
of the Hugging Face json files come from :mod:`mlxgpt.hf_config`, shared with the ONNX
export folder.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import mlxgpt
from mlxgpt.checkpoint import (
    CheckpointError,
    expected_shapes,
    read_config,
    read_json,
    read_tokenizer,
    read_weights,
    resolve,
    write_atomic_dir,
    write_json,
)
from mlxgpt.config import LAYER_NORM_EPS, ConfigError, GPTConfig
from mlxgpt.errors import UserError
from mlxgpt.hf_config import (
    ACTIVATIONS_FROM_HF,
    generation_config,
    hf_model_config,
    special_tokens_map,
    tokenizer_config,
)
from mlxgpt.tokenizer import EOT, Tokenizer, TokenizerError

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
PREFIX = "transformer."
HEAD = "lm_head.weight"
TOKENIZER_FILE = "tokenizer.json"

# GPT2Config's defaults, which transformers assumes for keys a config.json leaves out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


class HFError(UserError, ValueError):
    """A Hugging Face folder mlxgpt cannot import, or an OUT it must not write to."""


# -- configs --------------------------------------------------------------------------------
def gpt_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """The :class:`GPTConfig` of a GPT-2 ``config.json``; refuses what mlxgpt cannot compute.

    ``dropout`` comes from ``resid_pdrop`` (it only matters for fine-tuning; mlxgpt has no
    separate attention dropout).
    """
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise HFError(
            f"config.json says model_type {model_type!r}: mlxgpt imports GPT-2 checkpoints "
            "only (model_type 'gpt2', e.g. gpt2, distilgpt2 or a GPT2LMHeadModel you saved)"
        )
    hf = {**HF_DEFAULTS, **hf}
    problems = []
    act = hf["activation_function"]
    if act not in ACTIVATIONS_FROM_HF:
        problems.append(
            f"activation_function {act!r} (supported: {', '.join(ACTIVATIONS_FROM_HF)})"
        )
    eps = hf["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon {eps} (mlxgpt uses {LAYER_NORM_EPS})")
    if hf["n_inner"] not in (None, 4 * hf["n_embd"]):
        problems.append(f"n_inner {hf['n_inner']} (mlxgpt's MLP is 4 * n_embd wide)")
    if not hf["scale_attn_weights"]:
        problems.append("scale_attn_weights false (mlxgpt scales attention by 1/sqrt(head size))")
    if hf["scale_attn_by_inverse_layer_idx"]:
        problems.append("scale_attn_by_inverse_layer_idx true (mlxgpt does not scale by layer)")
    if hf["add_cross_attention"]:
        problems.append("add_cross_attention true (mlxgpt is decoder-only)")
    if problems:
        raise HFError(
            "config.json asks for what mlxgpt's GPT-2 does not compute: "
            + "; ".join(problems)
            + ". Only models with these settings at GPT-2's values can be imported."
        )
    try:
        return GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf["n_positions"]),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            dropout=float(hf["resid_pdrop"]),
            bias=True,
            activation=ACTIVATIONS_FROM_HF[act],
        )
    except (ConfigError, TypeError, ValueError) as err:
        raise HFError(f"config.json describes an invalid GPT-2: {err}") from None


# -- weights --------------------------------------------------------------------------------
def is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D)


def weights_from_hf(
    tensors: dict[str, np.ndarray], config: GPTConfig, tied: bool = True
) -> dict[str, np.ndarray]:
    """mlxgpt's float32 weights from a GPT-2 state dict (either key layout).

    ``tied=False`` (``tie_word_embeddings: false``) requires an ``lm_head.weight``; either
    way a head must equal ``wte``, or the model is not one mlxgpt can represent.
    """
    named: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name in named:
            raise HFError(f"the weights hold both {name} and {PREFIX}{name}: which is meant?")
        if not BUFFER.fullmatch(name):
            named[name] = value
    head = named.pop(HEAD, None)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(named))
    unexpected = sorted(set(named) - set(expected))
    if missing or unexpected:
        raise HFError(
            f"the weights do not match config.json (n_layer={config.n_layer}): "
            f"missing {missing[:5] or 'nothing'}, unexpected {unexpected[:5] or 'nothing'}. "
            "Check that model.safetensors and config.json come from the same GPT-2 model."
        )
    weights = {}
    for name, shape in expected.items():
        w = named[name].T if is_conv1d(name) else named[name]
        if w.shape != shape:
            want = shape[::-1] if is_conv1d(name) else shape
            raise HFError(
                f"tensor {name} has shape {tuple(named[name].shape)}, config.json implies "
                f"{want}: the weights and config.json do not belong together"
            )
        if not np.all(np.isfinite(w)):
            raise HFError(f"tensor {name} contains NaN or inf: the checkpoint is broken")
        weights[name] = np.ascontiguousarray(w, dtype=np.float32)
    if head is None and not tied:
        raise HFError(
            "config.json says tie_word_embeddings false but there is no lm_head.weight: "
            "the file lacks its output layer"
        )
    if head is not None and not (
        head.shape == weights["wte.weight"].shape and np.array_equal(head, weights["wte.weight"])
    ):
        raise HFError(
            "lm_head.weight differs from the token embedding (wte): an untied head. mlxgpt's "
            "head is the token embedding, so this model cannot be imported"
        )
    return weights


def weights_to_hf(weights: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """The state dict ``GPT2LMHeadModel.save_pretrained`` writes (tied head left out)."""
    full = dataclasses.replace(config, bias=True)
    out = {}
    for name, shape in expected_shapes(full).items():
        w = weights.get(name)
        if w is None:  # a bias=False model: zero biases compute the same function
            w = np.zeros(shape, dtype=np.float32)
        out[PREFIX + name] = np.ascontiguousarray(w.T if is_conv1d(name) else w, dtype=np.float32)
    return out


def read_hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` (or its shards), as float32 numpy arrays."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index} is corrupt: it has no weight_map")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
    else:
        others = sorted(p.name for p in hf_dir.glob("*") if p.suffix in (".bin", ".h5", ".msgpack"))
        hint = f" (it has {', '.join(others)}, which mlxgpt does not read)" if others else ""
        raise HFError(
            f"{hf_dir} has no model.safetensors{hint}. Convert it with transformers: "
            f"AutoModelForCausalLM.from_pretrained('{hf_dir}').save_pretrained('{hf_dir}') "
            "writes model.safetensors"
        )
    return {k: v for path in files for k, v in _read_safetensors(path).items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    if not path.is_file():
        raise HFError(f"{path} is missing (listed in model.safetensors.index.json)")
    tensors = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                dtype = f.get_slice(key).get_dtype()
                if dtype not in ("F16", "F32", "F64"):
                    raise HFError(
                        f"{path}: tensor {key} is {dtype}; mlxgpt imports float16/32/64 weights. "
                        "Save a float32 copy with transformers: model.float().save_pretrained(DIR)"
                    )
                tensors[key] = f.get_tensor(key).astype(np.float32)
    except HFError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise HFError(f"{path} is corrupt or truncated ({err}): save or copy it again") from None
    return tensors


# -- folders ----------------------------------------------------------------------------------
def check_new_out(out: Path) -> None:
    """OUT must not exist (an empty folder is fine): nothing of the user's is replaced."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise HFError(f"{out} already exists: choose a new OUT folder (or remove that one)")


def import_hf(hf_dir: str | Path, out: str | Path) -> tuple[Path, GPTConfig]:
    """Write the GPT-2 folder ``hf_dir`` as an mlxgpt checkpoint (no training state) in ``out``."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise HFError(f"{hf_dir} is not a folder: pass the folder of a Hugging Face GPT-2 model")
    if not (hf_dir / "config.json").is_file():
        raise HFError(
            f"{hf_dir} is not a Hugging Face model folder: it has no config.json. Pass the "
            "folder save_pretrained wrote (config.json, model.safetensors, tokenizer.json)"
        )
    check_new_out(out)
    try:
        hf = read_json(hf_dir / "config.json")
    except CheckpointError as err:
        raise HFError(str(err)) from None
    config = gpt_config_from_hf(hf)
    _check_hf_tokenizer(hf_dir, config)
    tied = bool(hf.get("tie_word_embeddings", True))
    weights = weights_from_hf(read_hf_tensors(hf_dir), config, tied=tied)

    def write(tmp: Path) -> None:
        from safetensors.numpy import save_file

        metadata = {"mlxgpt": mlxgpt.__version__, "imported_from": "huggingface gpt2"}
        save_file(weights, str(tmp / "model.safetensors"), metadata=metadata)
        write_json(tmp / "config.json", dataclasses.asdict(config))
        shutil.copyfile(hf_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)

    return write_atomic_dir(out, write), config


def _check_hf_tokenizer(hf_dir: Path, config: GPTConfig) -> None:
    """The folder's tokenizer.json must load, fit the embedding and have what mlxgpt needs."""
    path = hf_dir / TOKENIZER_FILE
    if not path.is_file():
        raise HFError(
            f"{hf_dir} has no tokenizer.json. Write one with transformers: "
            f"AutoTokenizer.from_pretrained('{hf_dir}').save_pretrained('{hf_dir}')"
        )
    try:
        tokenizer = Tokenizer.load(path)
    except TokenizerError as err:
        raise HFError(str(err)) from None
    if tokenizer.kind == "bpe" and EOT not in tokenizer.vocab:
        raise HFError(f"{path} has no {EOT} token, which mlxgpt's BPE models start and end with")
    if tokenizer.vocab_size != config.vocab_size:
        raise HFError(
            f"{path} has {tokenizer.vocab_size} tokens but config.json says vocab_size="
            f"{config.vocab_size}: mlxgpt needs one embedding row per token, no more, no less"
        )


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an mlxgpt checkpoint as a folder transformers loads as ``GPT2LMHeadModel``."""
    from safetensors.numpy import save_file

    out = Path(out)
    ckpt = resolve(checkpoint)
    check_new_out(out)
    config = read_config(ckpt)
    weights = weights_to_hf(read_weights(ckpt, config), config)
    tokenizer = read_tokenizer(ckpt, config)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_model_config(config, tokenizer))
        write_json(tmp / "generation_config.json", generation_config(config, tokenizer))
        tokenizer.for_clients().save(tmp / TOKENIZER_FILE)
        write_json(tmp / "tokenizer_config.json", tokenizer_config(config, tokenizer))
        write_json(tmp / "special_tokens_map.json", special_tokens_map(tokenizer))

    return write_atomic_dir(out, write)


def describe(config: GPTConfig) -> str:
    """One line about a model's shape, for the command line."""
    return (
        f"{config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, "
        f"context {config.block_size}, vocabulary {config.vocab_size}, {config.activation}"
    )
