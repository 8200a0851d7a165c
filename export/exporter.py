"""``mlxgpt export CKPT_DIR OUT_DIR``: write a checkpoint as a folder every ONNX client loads.

The folder (written atomically: a failed export leaves nothing behind) is a Hugging Face
model folder, so each client loads it with its own standard call, nothing written by hand::

    onnx/model.onnx          the graph of mlxgpt_export.graph, weights inside (stored once);
                             metadata_props: mlxgpt_version, model_config, attention,
                             dtype, quantization, parity. Named by precision (MODEL_FILES:
                             model_fp16.onnx, model_quantized.onnx); weights above
                             ``external_data_threshold`` (2 GiB) in "<file>_data" beside it
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

**Precisions** (:func:`precision_of`): float32; float16 (:mod:`mlxgpt_export.graph` builds it
in half precision); int8 (onnxruntime's ``quantize_dynamic`` on the float32 graph:
:func:`quantize_int8`).

Only numpy, safetensors, onnx and onnxruntime are used: no MLX. The model file is written
into the export's temporary folder, checked there (``onnx.checker`` with ``full_check``)
and, unless ``verify=False``, run in onnxruntime against a numpy reference
(:mod:`mlxgpt_export.parity`); the figures measured go into the model's metadata. A failure
removes the temporary folder: nothing is written. :func:`write_checked_model` says how
the memory peak is kept low.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
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
from mlxgpt_export.graph import ATTENTION_FORMS, DTYPES, OPSETS, build_model
from mlxgpt_export.parity import DIFF_KEYS, Reference, measure_parity, reference
from mlxgpt_export.runtime import (
    CONFIG_FILE,
    GENERATION_FILE,
    LEGACY_MODEL_FILE,
    MLXGPT_KEY,
    MODEL_FILE,
    MODEL_FILES,
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
EXTERNAL_DATA_SUFFIX = "_data"  # onnx/model.onnx -> onnx/model.onnx_data (transformers.js')
QUANTIZATIONS = ("int8",)
# transformers.js's name for each precision: its `dtype` option picks the file by it.
JS_DTYPES = {"float32": "fp32", "float16": "fp16", "int8": "q8"}
# int8: quantize the LM head too (its own int8 copy of wte^T; the input Gather keeps the
# float32 wte, so token embeddings stay exact). Measured in scripts/bench_precision.py.
QUANTIZE_HEAD = True
# What `--force` may replace: a folder whose entries are all ones an export writes (today's
# EXPORT_ENTRIES, or the model file at the top of a folder exported before the onnx/ layout)
# and that carries mlxgpt's mark; inside onnx/, only the model files an export writes.
REPLACEABLE_ENTRIES = frozenset((*EXPORT_ENTRIES, LEGACY_MODEL_FILE))
MODEL_DIR_ENTRIES = frozenset(
    name + suffix
    for name in (Path(f).name for f in MODEL_FILES.values())
    for suffix in ("", EXTERNAL_DATA_SUFFIX)
)


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


def transformers_js_config(precision: str, external: bool) -> dict[str, Any]:
    """``config.json``'s ``transformers.js_config``: which file transformers.js loads.

    Its ``dtype`` picks the file by suffix (``fp32``: model.onnx, ``fp16``: model_fp16.onnx,
    ``q8``: model_quantized.onnx), so ``from_pretrained(name)`` finds this folder's one model
    without a ``dtype`` option; ``use_external_data_format`` names the file whose weights
    sit in ``<file>_data`` (one chunk).
    """
    js: dict[str, Any] = {"dtype": JS_DTYPES[precision]}
    if external:
        js["use_external_data_format"] = {Path(MODEL_FILES[precision]).name: 1}
    return js


def model_config(
    config: GPTConfig, tokenizer: Tokenizer, precision: str = "float32", external: bool = False
) -> dict[str, Any]:
    """``config.json``: GPT-2's keys for the clients, mlxgpt's GPTConfig for mlxgpt-ort."""
    return {
        **hf_model_config(config, tokenizer),
        "transformers.js_config": transformers_js_config(precision, external),
        MLXGPT_KEY: dataclasses.asdict(config),
    }


def genai_config(
    config: GPTConfig, tokenizer: Tokenizer, model_file: str = MODEL_FILE
) -> dict[str, Any]:
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
                "filename": model_file,
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
    return config, weights, tokenizer.for_clients()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def precision_of(dtype: str = "float32", quantize: str | None = None) -> str:
    """The export's precision: ``"float32"``, ``"float16"`` or ``"int8"`` (a key of MODEL_FILES)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is None:
        return dtype
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if dtype != "float32":
        raise ExportError(
            f"--quantize {quantize} quantizes the float32 graph: leave out --dtype {dtype}"
        )
    return quantize


def _check_float16_range(weights: dict[str, np.ndarray]) -> None:
    limit = float(np.finfo(np.float16).max)
    for name, w in weights.items():
        if w.size and float(np.abs(w).max()) > limit:
            raise ExportError(
                f"{name} holds values beyond float16's range (|w| up to "
                f"{float(np.abs(w).max()):.3g} > {limit:g}): export it in float32 (no --dtype)"
            )


def quantize_int8(source: Path, target: Path) -> onnx.ModelProto:
    """The model at ``source`` with dynamic int8 MatMul weights, by onnxruntime's own
    ``quantize_dynamic`` (written at ``target`` with external data, and loaded).

    Every MatMul whose weight is an initializer gets int8 weights (one scale per tensor,
    symmetric) and quantizes its input to uint8 at run time, per call
    (``DynamicQuantizeLinear`` + ``MatMulInteger``: standard ONNX operators, which
    onnxruntime fuses). Only MatMul: by default the tool also rewrites the standard
    ``Attention`` operator into an invalid contrib operator, and would quantize the
    embedding Gather; the attention products (q k^T, p v) have no constant weight and stay
    float32. Runs on the graph as built, before any optimisation, from files (weights as
    external data, so a model above 2 GiB works too).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its advice to pre-process (shape inference) first
    try:
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )
    finally:
        logging.disable(logging.NOTSET)
    return onnx.load(target)  # weights back in memory (a quarter of float32's)


def check_attention(attention: str) -> None:
    if attention not in ATTENTION_FORMS:
        raise ExportError(
            f"--attention must be one of {', '.join(ATTENTION_FORMS)}, got {attention!r}"
        )


def build_graph(
    config: GPTConfig, weights: dict[str, np.ndarray], attention: str, precision: str
) -> onnx.ModelProto:
    """The ONNX model of ``precision`` before quantization (int8: see quantize_int8)."""
    check_attention(attention)
    if precision == "float16":
        _check_float16_range(weights)
        return build_model(config, weights, attention, "float16")
    separate_head = precision == "int8" and QUANTIZE_HEAD
    return build_model(config, weights, attention, separate_head=separate_head)


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path, external: bool) -> bool:
    """Write ``model`` to ``path``: one file, or (``external``) the graph there and its
    weights in ``path`` + ``_data`` (ONNX external data; ``model``'s weights are moved out
    of memory as they are written). Returns whether a data file was written.

    Tensors under 1 KiB (onnx's default threshold) stay in the graph: the shapes and axes
    the checker's shape inference must read, and every tensor of a very small model.
    """
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    if external:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
        )
        shutil.copymode(path, data)  # onnx creates it private (0600); share it like the graph
    else:
        onnx.save_model(model, path)
    for written in (path, data):
        if written.exists():
            _fsync(written)
    return data.exists()


def check_written_model(path: Path) -> None:
    """``onnx.checker`` with ``full_check`` on the written file (external data resolved)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:  # a bug in the exporter, not the user's
        raise ExportError(f"internal error: the exported graph is invalid: {err}") from None


def verify_parity(path: Path, config: GPTConfig, ref: Reference, precision: str) -> dict[str, Any]:
    """Run the written model in onnxruntime against the numpy reference (mlxgpt_export.parity)."""
    parity = {
        "measured": True,
        **measure_parity(OnnxGPT(make_session(path), config), ref, precision),
    }
    if not parity["passed"]:
        raise ExportError(
            f"parity check failed ({precision}): onnxruntime and the numpy reference disagree "
            f"(max |logit difference| {parity['max_abs_diff']:.3g} > {parity['tolerance']:.3g}, "
            f"fully padded row finite: {parity['fully_padded_row_finite']}). "
            "Nothing was written; please report this with the checkpoint's config.json."
        )
    return parity


def write_checked_model(
    path: Path,
    config: GPTConfig,
    weights: dict[str, np.ndarray],
    attention: str = "portable",
    precision: str = "float32",
    verify: bool = True,
    external_data_threshold: int = PROTOBUF_LIMIT,
) -> tuple[dict[str, Any], bool]:
    """Build, write, check and measure the model of ``weights`` at ``path``; its parity
    figures, and whether its weights went to external data (``path`` + ``_data``, when
    they exceed ``external_data_threshold`` bytes).

    Peak memory is kept near two copies of the weights. ``weights`` is *emptied* once the
    graph is built and the reference logits computed (the caller hands them over); the
    model is dropped once written; the checker and onnxruntime read the file. The parity
    figures then go into the file's metadata (only the small graph file is rewritten when
    the weights are external).
    """
    model = build_graph(config, weights, attention, precision)
    ref = reference(weights, config) if verify else None
    weights.clear()  # the last references to the checkpoint's arrays
    if precision == "int8":  # the float32 model goes to a file and out of memory first
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            source = Path(scratch) / "float32.onnx"
            save_model(model, source, external=True)
            del model  # upb frees the weights only with the whole message
            model = quantize_int8(source, source.with_name("int8.onnx"))
    external = save_model(model, path, weight_bytes(model) > external_data_threshold)
    del model  # written: the checker and onnxruntime read the file
    check_written_model(path)
    parity = {"measured": False}
    if ref is not None:
        parity = verify_parity(path, config, ref, precision)
    write_metadata(
        path,
        {
            "mlxgpt_version": mlxgpt.__version__,
            "model_config": json.dumps(dataclasses.asdict(config)),
            "attention": attention,
            "dtype": "float16" if precision == "float16" else "float32",
            "quantization": precision if precision in QUANTIZATIONS else "none",
            "parity": json.dumps(parity),
        },
    )
    return parity, external


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set the model file's ``metadata_props`` (its external data file is left as it is)."""
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, metadata)
    onnx.save_model(model, path)
    _fsync(path)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    attention: str = "portable",
    force: bool = False,
    verify: bool = True,
    quiet: bool = False,
    dtype: str = "float32",
    quantize: str | None = None,
    external_data_threshold: int = PROTOBUF_LIMIT,
) -> Path:
    """Export ``checkpoint`` (a training out_dir or its ckpt/) to the folder ``out_dir``.

    ``dtype="float16"`` writes a float16 graph (``onnx/model_fp16.onnx``), ``quantize="int8"``
    a float32 graph with int8 MatMul weights (``onnx/model_quantized.onnx``). Weights above
    ``external_data_threshold`` bytes (default: what one .onnx file can hold) are written
    as ONNX external data beside the model file.
    """
    out = Path(out_dir)
    ckpt = resolve(checkpoint)
    _check_out_dir(out, ckpt, force)
    precision = precision_of(dtype, quantize)
    check_attention(attention)
    model_file = MODEL_FILES[precision]
    config, weights, tokenizer = _load_checkpoint(ckpt)
    outcome: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        (tmp / MODEL_DIR).mkdir()
        outcome["parity"], outcome["external"] = write_checked_model(
            tmp / model_file,
            config,
            weights,  # handed over: emptied once no longer needed
            attention,
            precision,
            verify,
            external_data_threshold,
        )
        _fsync(tmp / MODEL_DIR)  # write_atomic_dir syncs the top-level files only
        external = outcome["external"]
        write_json(tmp / CONFIG_FILE, model_config(config, tokenizer, precision, external))
        write_json(tmp / GENERATION_FILE, generation_config(config, tokenizer))
        tokenizer.save(tmp / TOKENIZER_FILE)
        write_json(tmp / TOKENIZER_CONFIG_FILE, tokenizer_config(config, tokenizer))
        write_json(tmp / SPECIAL_TOKENS_FILE, special_tokens_map(tokenizer))
        write_json(tmp / GENAI_FILE, genai_config(config, tokenizer, model_file))

    write_atomic_dir(out, write)
    if not quiet:
        _print_summary(ckpt, out, model_file, attention, precision, **outcome)
    return out


def _print_summary(
    ckpt: Path,
    out: Path,
    model_file: str,
    attention: str,
    precision: str,
    parity: dict[str, Any],
    external: bool,
) -> None:
    files = sorted(p for p in (out / MODEL_DIR).iterdir())
    size = sum(p.stat().st_size for p in files) / 1e6
    stored = " + ".join(f"{MODEL_DIR}/{p.name}" for p in files)
    print(
        f"exported {ckpt} -> {out}: {stored} ({size:.3g} MB, {precision}, {attention} attention, "
        f"opset {OPSETS[attention]}{', external data' if external else ''}), "
        f"{', '.join(EXPORT_ENTRIES[1:])}"
    )
    if parity["measured"]:
        shown = ", ".join(f"{k} {parity[k]:.2g}" for k in DIFF_KEYS if k in parity)
        print(
            f"parity vs numpy reference, max |logit difference|: {shown} (bound "
            f"{parity['tolerance']:.2g} for {precision}); fully padded row finite: "
            f"{parity['fully_padded_row_finite']}"
        )
    print(f"run it: mlxgpt-ort generate {out} --prompt '...'")
