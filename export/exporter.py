"""``mlxgpt export CKPT_DIR OUT_DIR``: write a checkpoint as a folder every ONNX client loads.

The folder (written atomically: a failed export leaves nothing behind) is a Hugging Face
model folder, so each client loads it with its own standard call, nothing written by hand::

    onnx/model.onnx          the graph of mlxgpt_export.graph, weights inside (stored once);
                             metadata_props: mlxgpt_version, model_config, attention, parity
    config.json              Hugging Face GPT-2 config (model_type "gpt2") with mlxgpt's
                             GPTConfig under "mlxgpt" (mlxgpt.hf_config)
    generation_config.json   default sampling settings (mlxgpt.sampling), bos/eos/pad ids
    tokenizer.json           the checkpoint's tokenizer, in the form every client reads
                             alike (Tokenizer.for_clients; same ids)
    tokenizer_config.json    tokenizer class, special tokens, left padding (transformers,
    special_tokens_map.json  transformers.js, onnxruntime-genai)
    genai_config.json        onnxruntime-genai's description of the decoder

``onnx/`` is where transformers.js looks; Optimum finds the model there by itself and
genai's config names it. mlxgpt-ort reads onnx/model.onnx, config.json, tokenizer.json and
generation_config.json (:mod:`mlxgpt_export.runtime`).

**Special tokens** mean what they mean in mlxgpt (:mod:`mlxgpt.tokenizer`): the start token
(an empty prompt's first token) is ``bos``; the end-of-text token stops generation and
is ``eos`` (``<|endoftext|>`` for BPE, also its ``pad``). A char model has no end token, so
``eos`` and ``pad`` stay null and its tokenizer declares no special token at all: declaring
the newline would make ``decode(skip_special_tokens=True)`` delete every newline in
transformers. The one exception is forced by onnxruntime-genai, which requires an
``eos_token_id`` inside the vocabulary: see :func:`genai_stop_id`.

Only numpy, safetensors, onnx and onnxruntime are used: no MLX. Before anything is written
the graph is checked (``onnx.checker`` with ``full_check``) and, unless ``verify=False``,
run in onnxruntime against a numpy reference (:mod:`mlxgpt_export.parity`); the figures measured
go into the model's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import mlxgpt
from mlxgpt import sampling
from mlxgpt.checkpoint import (
    read_config,
    read_tokenizer,
    read_weights,
    resolve,
    write_atomic_dir,
    write_json,
)
from mlxgpt.config import GPTConfig
from mlxgpt.hf_config import (
    generation_config,
    hf_model_config,
    special_tokens_map,
    tokenizer_config,
)
from mlxgpt.tokenizer import Tokenizer
from mlxgpt_export import signature as sig
from mlxgpt_export.errors import ExportError
from mlxgpt_export.graph import ATTENTION_FORMS, OPSETS, build_model
from mlxgpt_export.parity import DIFF_KEYS, measure_parity
from mlxgpt_export.runtime import (
    CONFIG_FILE,
    GENERATION_FILE,
    LEGACY_MODEL_FILE,
    MLXGPT_KEY,
    MODEL_FILE,
    TOKENIZER_FILE,
    OnnxGPT,
    make_session,
)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENAI_FILE = "genai_config.json"
MODEL_DIR = MODEL_FILE.split("/")[0]  # "onnx"
# Every file and folder an export writes at the top of OUT_DIR, and nothing else.
EXPORT_ENTRIES = (
    MODEL_DIR,
    CONFIG_FILE,
    GENERATION_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_FILE,
    GENAI_FILE,
)

PROTOBUF_LIMIT = 2**31 - 2**24  # one .onnx file holds < 2 GiB; keep 16 MiB for the graph
# What `--force` may replace: a folder whose entries are all ones an export writes (today's
# EXPORT_ENTRIES, or the model file at the top of a folder exported before the onnx/ layout)
# and that carries mlxgpt's mark; inside onnx/, only the model files an export writes.
REPLACEABLE_ENTRIES = frozenset((*EXPORT_ENTRIES, LEGACY_MODEL_FILE))
MODEL_DIR_ENTRIES = frozenset((MODEL_FILE.split("/")[1],))


def genai_stop_id(tokenizer: Tokenizer) -> int:
    """The ``eos_token_id`` (and ``pad_token_id``) of ``genai_config.json``.

    The end-of-text token where there is one. onnxruntime-genai (0.18) refuses a config
    without an end token inside the vocabulary, and a char model has none: it gets the
    highest id (the character with the highest code point, usually a rare one), so genai
    stops a char model only if it draws that character — never at a newline, which is the
    start token. Every other client writes a char model's full length. (Checked: genai
    rejects null and out-of-range ids; an empty ``eos_token_id`` list makes it fall back to
    ``pad_token_id`` as the end token, so it does not mean "none" either.)
    """
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.vocab_size - 1


def model_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``config.json``: GPT-2's keys for the clients, mlxgpt's GPTConfig for mlxgpt-ort."""
    return {**hf_model_config(config, tokenizer), MLXGPT_KEY: dataclasses.asdict(config)}


def genai_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``genai_config.json``: onnxruntime-genai's description of the same graph.

    ``past_present_share_buffer`` is false: the graph returns ``present`` as a new tensor
    (past + new keys), it does not write into a preallocated buffer. genai cannot go past
    ``context_length`` (its ``max_length`` counts prompt + new tokens), so it generates at
    most ``block_size`` tokens in all. Sampling keys: the same defaults as
    ``generation_config.json`` (genai reads ``top_k`` 0 as off, like transformers).
    """
    stop = genai_stop_id(tokenizer)
    past_key, past_value = sig.past_names(0)
    present_key, present_value = sig.present_names(0)
    defaults = sampling.to_generation_config(sampling.SamplingParams(), sampling.DEFAULT_MAX_TOKENS)
    return {
        "model": {
            "type": "decoder",
            "context_length": config.block_size,
            "vocab_size": config.vocab_size,
            "bos_token_id": tokenizer.start_id,
            "eos_token_id": stop,
            "pad_token_id": stop,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "mlxgpt", "provider_options": []},
                "head_size": config.head_size,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_key_value_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "inputs": {
                    "input_ids": sig.INPUT_IDS,
                    "attention_mask": sig.ATTENTION_MASK,
                    "position_ids": sig.POSITION_IDS,
                    "past_key_names": past_key.replace(".0.", ".%d."),
                    "past_value_names": past_value.replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": sig.LOGITS,
                    "present_key_names": present_key.replace(".0.", ".%d."),
                    "present_value_names": present_value.replace(".0.", ".%d."),
                },
            },
        },
        "search": {
            **{
                k: v
                for k, v in defaults.items()
                if k in ("do_sample", "temperature", "top_k", "top_p")
            },
            "num_beams": 1,
            "num_return_sequences": 1,
            "min_length": 0,
            "max_length": config.block_size,
            "past_present_share_buffer": False,
        },
    }


def is_export_folder(folder: Path) -> bool:
    """True if ``folder`` holds only files an export writes and carries mlxgpt's mark
    (``mlxgpt_version`` in its generation_config.json)."""
    if not set(os.listdir(folder)) <= REPLACEABLE_ENTRIES:
        return False
    model_dir = folder / MODEL_DIR
    if model_dir.exists() and (
        model_dir.is_symlink()
        or not model_dir.is_dir()
        or not set(os.listdir(model_dir)) <= MODEL_DIR_ENTRIES
    ):
        return False
    try:
        generation = json.loads((folder / GENERATION_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(generation, dict) and "mlxgpt_version" in generation


def _check_out_dir(out: Path, ckpt: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} is a file or a link, not a folder: choose another OUT_DIR")
    out_abs, ckpt_abs = out.resolve(), ckpt.resolve()
    if out_abs == ckpt_abs or out_abs in ckpt_abs.parents:
        raise ExportError(
            f"OUT_DIR {out} would replace the checkpoint {ckpt} itself: choose another folder"
        )
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: pass --force to replace it")
    if out.exists() and os.listdir(out) and not is_export_folder(out):
        raise ExportError(
            f"{out} is not an mlxgpt export folder (it holds other files): --force replaces "
            "only a previous export or an empty folder. Choose another OUT_DIR."
        )


def _load_checkpoint(ckpt: Path) -> tuple[GPTConfig, dict[str, np.ndarray], Tokenizer]:
    config = read_config(ckpt)
    weights = read_weights(ckpt, config)
    tokenizer = read_tokenizer(ckpt, config)
    size = sum(w.nbytes for w in weights.values())
    if size > PROTOBUF_LIMIT:
        raise ExportError(
            f"the model has {size / 2**30:.1f} GiB of weights; a single-file ONNX model holds "
            "less than 2 GiB and ONNX external data is not supported by this exporter yet"
        )
    return config, weights, tokenizer.for_clients()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_checked_model(
    config: GPTConfig, weights: dict[str, np.ndarray], attention: str, verify: bool
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The checked ONNX model with its metadata, and the parity figures (measured first)."""
    if attention not in ATTENTION_FORMS:
        raise ExportError(
            f"--attention must be one of {', '.join(ATTENTION_FORMS)}, got {attention!r}"
        )
    model = build_model(config, weights, attention)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:  # a bug in the exporter, not the user's
        raise ExportError(f"internal error: the exported graph is invalid: {err}") from None
    parity: dict[str, Any] = {"measured": False}
    if verify:
        session = make_session(model.SerializeToString())
        parity = {"measured": True, **measure_parity(OnnxGPT(session, config), weights)}
        if not parity["passed"]:
            raise ExportError(
                "parity check failed: onnxruntime and the numpy reference disagree "
                f"(max |logit difference| {parity['max_abs_diff']:.3g} > {parity['tolerance']}, "
                f"fully padded row finite: {parity['fully_padded_row_finite']}). "
                "Nothing was written; please report this with the checkpoint's config.json."
            )
    metadata = {
        "mlxgpt_version": mlxgpt.__version__,
        "model_config": json.dumps(dataclasses.asdict(config)),
        "attention": attention,
        "parity": json.dumps(parity),
    }
    onnx.helper.set_model_props(model, metadata)
    return model, parity


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    attention: str = "portable",
    force: bool = False,
    verify: bool = True,
    quiet: bool = False,
) -> Path:
    """Export ``checkpoint`` (a training out_dir or its ckpt/) to the folder ``out_dir``."""
    out = Path(out_dir)
    ckpt = resolve(checkpoint)
    _check_out_dir(out, ckpt, force)
    config, weights, tokenizer = _load_checkpoint(ckpt)
    model, parity = build_checked_model(config, weights, attention, verify)

    def write(tmp: Path) -> None:
        (tmp / MODEL_DIR).mkdir()
        onnx.save_model(model, str(tmp / MODEL_FILE))
        _fsync(tmp / MODEL_FILE)  # write_atomic_dir syncs the top-level files only
        _fsync(tmp / MODEL_DIR)
        write_json(tmp / CONFIG_FILE, model_config(config, tokenizer))
        write_json(tmp / GENERATION_FILE, generation_config(config, tokenizer))
        tokenizer.save(tmp / TOKENIZER_FILE)
        write_json(tmp / TOKENIZER_CONFIG_FILE, tokenizer_config(config, tokenizer))
        write_json(tmp / SPECIAL_TOKENS_FILE, special_tokens_map(tokenizer))
        write_json(tmp / GENAI_FILE, genai_config(config, tokenizer))

    write_atomic_dir(out, write)
    if not quiet:
        size = (out / MODEL_FILE).stat().st_size / 1e6
        print(
            f"exported {ckpt} -> {out}: {MODEL_FILE} ({size:.3g} MB, {attention} attention, "
            f"opset {OPSETS[attention]}), {', '.join(EXPORT_ENTRIES[1:])}"
        )
        if parity["measured"]:
            shown = ", ".join(f"{k} {parity[k]:.2g}" for k in DIFF_KEYS if k in parity)
            print(
                f"parity vs numpy reference, max |logit difference|: {shown}; "
                f"fully padded row finite: {parity['fully_padded_row_finite']}"
            )
        print(f"run it: mlxgpt-ort generate {out} --prompt '...'")
    return out
