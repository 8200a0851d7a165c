"""``mlxgpt export CKPT_DIR OUT_DIR``: write a checkpoint as a self-contained ONNX folder.

The folder (written atomically: a failed export leaves nothing behind)::

    model.onnx              the graph of mlxgpt_export.graph, weights inside; metadata_props:
                            mlxgpt_version, model_config, attention, parity
    config.json             the GPTConfig (same format as the checkpoint's)
    tokenizer.json          the checkpoint's Hugging Face tokenizer file
    generation_config.json  default sampling settings, start token and context length

Only numpy, safetensors, onnx and onnxruntime are used: no MLX. Before anything is written
the graph is checked (``onnx.checker`` with ``full_check``) and, unless ``verify=False``,
run in onnxruntime against a numpy reference (:mod:`mlxgpt_export.parity`); the figures measured
go into the model's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
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
from mlxgpt.tokenizer import Tokenizer
from mlxgpt_export.errors import ExportError
from mlxgpt_export.graph import ATTENTION_FORMS, OPSETS, build_model
from mlxgpt_export.parity import DIFF_KEYS, measure_parity
from mlxgpt_export.runtime import (
    CONFIG_FILE,
    GENERATION_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    OnnxGPT,
    make_session,
)

PROTOBUF_LIMIT = 2**31 - 2**24  # one .onnx file holds < 2 GiB; keep 16 MiB for the graph
# Every entry an export folder may hold: `--force` replaces a folder only if all its entries
# are in this list and it carries mlxgpt's mark (or it is empty). Add new files here.
EXPORT_ENTRIES = frozenset((MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, GENERATION_FILE))


def generation_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``generation_config.json``: the library's sampling defaults, in Hugging Face keys."""
    return {
        "bos_token_id": tokenizer.start_id,  # what an empty prompt starts from
        "context_length": config.block_size,
        **sampling.to_generation_config(sampling.SamplingParams(), sampling.DEFAULT_MAX_TOKENS),
        "prompt_longer_than_context": "keep the last context_length tokens",
        "mlxgpt_version": mlxgpt.__version__,
    }


def is_export_folder(folder: Path) -> bool:
    """True if ``folder`` holds only files an export writes and carries mlxgpt's mark
    (``mlxgpt_version`` in its generation_config.json)."""
    if not set(os.listdir(folder)) <= EXPORT_ENTRIES:
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
    return config, weights, tokenizer


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
        onnx.save_model(model, str(tmp / MODEL_FILE))
        write_json(tmp / CONFIG_FILE, dataclasses.asdict(config))
        shutil.copyfile(ckpt / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        write_json(tmp / GENERATION_FILE, generation_config(config, tokenizer))

    write_atomic_dir(out, write)
    if not quiet:
        size = (out / MODEL_FILE).stat().st_size / 1e6
        print(
            f"exported {ckpt} -> {out}: {MODEL_FILE} ({size:.3g} MB, {attention} attention, "
            f"opset {OPSETS[attention]}), {CONFIG_FILE}, {TOKENIZER_FILE}, {GENERATION_FILE}"
        )
        if parity["measured"]:
            shown = ", ".join(f"{k} {parity[k]:.2g}" for k in DIFF_KEYS if k in parity)
            print(
                f"parity vs numpy reference, max |logit difference|: {shown}; "
                f"fully padded row finite: {parity['fully_padded_row_finite']}"
            )
        print(f"run it: mlxgpt-ort generate {out} --prompt '...'")
    return out
