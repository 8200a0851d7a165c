"""Run an exported model with onnxruntime: forward pass, KV cache, generation. No MLX.

Dependencies: numpy, onnxruntime and tokenizers (to encode and decode with the exported
``tokenizer.json``); ``onnx`` itself is not needed. Generation reuses mlxgpt's one
sampling implementation (:mod:`mlxgpt.sampling`), so for the same checkpoint, prompt,
settings and seed this runtime and ``mlxgpt generate`` (MLX) produce the same text.

Quick use::

    from mlxgpt_export.runtime import OnnxGPT
    from mlxgpt.sampling import SamplingParams

    model = OnnxGPT.load("out/tiny-char-onnx")
    for piece in model.generate("ROMEO:", max_tokens=100, params=SamplingParams(seed=1)):
        print(piece, end="", flush=True)
    texts = model.generate_batch(["ROMEO:", "JULIET: O"], max_tokens=50)

Generation decodes with an in-place KV cache: on first use the model file's graph is
rewritten (:mod:`mlxgpt_export.in_place`) so each layer's attention writes its new keys and
values into fixed buffers instead of returning ``Concat(past, new)``, a copy of the whole
cache per step. :meth:`OnnxGPT.forward` and the server's batching engine run the graph as
exported. ``model.in_place = False`` (``mlxgpt-ort generate --no-in-place``) decodes on the
exported graph too, without the second session the rewrite needs.

Context window (same rule as MLX generation): a prompt longer than ``block_size`` tokens
keeps its last ``block_size`` tokens; once prompt + generated text no longer fit, the
window slides and the last ``block_size`` tokens are recomputed without a cache. Batched
generation applies the rule to every row. :meth:`OnnxGPT.forward` itself never crops:
a sequence longer than the window is an :class:`~mlxgpt_export.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mlxgpt import sampling
from mlxgpt.checkpoint import CheckpointError, read_json, read_tokenizer
from mlxgpt.config import ConfigError, GPTConfig, gpt_config_from_dict
from mlxgpt.hf_config import shape_mismatches
from mlxgpt.sampling import (
    SamplingParams,
    StepFn,
    check_max_tokens,
    crop_prompt,
    generate_ids,
    is_whole,
    sample_rows,
)
from mlxgpt.tokenizer import Tokenizer, prompt_ids, stream_text
from mlxgpt_export import signature as sig
from mlxgpt_export.errors import ExportFolderError, InputError
from mlxgpt_export.in_place import SEQLENS_K, TOTAL_LENGTH, write_in_place_model

# The files of an export folder that this runtime reads (the exporter writes more, for
# other clients: mlxgpt_export.exporter.EXPORT_ENTRIES).
MODEL_FILE = "onnx/model.onnx"  # where transformers.js looks; Optimum and genai find it there too
# The model file of each precision, named as transformers.js names them (dtype "fp16",
# "q8"); a folder holds one. Weights over 2 GiB sit beside it in "<file>_data".
MODEL_FILES = {
    "float32": MODEL_FILE,
    "float16": "onnx/model_fp16.onnx",
    "int8": "onnx/model_quantized.onnx",
}
CONFIG_FILE = "config.json"  # Hugging Face GPT-2 config; mlxgpt's GPTConfig under MLXGPT_KEY
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"
FOLDER_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, GENERATION_FILE)
MLXGPT_KEY = "mlxgpt"
# Folders exported before the layout above: model.onnx beside a config.json that is the
# GPTConfig itself. They still load.
LEGACY_MODEL_FILE = "model.onnx"
REEXPORT = "export it again with `mlxgpt export CKPT_DIR OUT_DIR --force`"

# Keys and values of every layer: [(key, value), ...], each (batch, n_head, time, head_size).
Past = list[tuple[np.ndarray, np.ndarray]]
PAST_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def check_token_ids(ids: np.ndarray | Sequence[int], vocab_size: int) -> None:
    """Raise :class:`InputError` for ids outside ``0..vocab_size-1`` (ORT would wrap negatives)."""
    array = np.asarray(ids)
    bad = array[(array < 0) | (array >= vocab_size)]
    if bad.size:
        raise InputError(
            f"token id(s) {bad[:5].tolist()} out of range: this model's vocabulary has ids "
            f"0..{vocab_size - 1}"
        )


# -- input checks: forward() and generation refuse what the graph would misread -------------
def _whole_array(values: Any, name: str, allow_bool: bool = False) -> np.ndarray:
    """``values`` as a numpy array of whole numbers, or an :class:`InputError` that says why."""
    try:
        array = np.asarray(values)
    except ValueError:  # numpy refuses ragged nested lists
        lengths = [len(row) for row in values] if isinstance(values, Sequence) else "?"
        raise InputError(
            f"{name} rows have different lengths ({lengths}): every row of a batch needs "
            "the same length (left-pad the shorter ones and mark the padding 0 in "
            "attention_mask, as generate_batch does)"
        ) from None
    if array.dtype == object:
        raise InputError(f"{name} rows have different lengths or hold non-numbers")
    if not (np.issubdtype(array.dtype, np.integer) or (allow_bool and array.dtype == bool)):
        raise InputError(f"{name} must hold whole numbers (integers), got {array.dtype} values")
    return array


def check_input_ids(input_ids: Any, vocab_size: int) -> np.ndarray:
    """``input_ids`` as int64 ``(batch, tokens)``: rectangular, integer, in the vocabulary."""
    ids = _whole_array(input_ids, "input_ids")
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise InputError(f"input_ids must have shape (batch, tokens), got {ids.shape}")
    check_token_ids(ids, vocab_size)
    return ids.astype(np.int64)


def check_attention_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """``attention_mask`` as int64 of ``shape`` (batch, past + new), holding only 0 and 1."""
    array = _whole_array(mask, "attention_mask", allow_bool=True)
    if array.shape != shape:
        raise InputError(
            f"attention_mask must have shape (batch, past + new) = {shape}, got {array.shape}"
        )
    odd = (array != 0) & (array != 1)
    if odd.any():
        values = np.unique(array[odd])[:5].tolist()
        raise InputError(f"attention_mask must hold only 1 (a token) and 0 (padding), got {values}")
    return array.astype(np.int64)


def check_position_ids(position_ids: Any, shape: tuple[int, int], block_size: int) -> np.ndarray:
    """``position_ids`` as int64 of ``shape`` (batch, new), each in ``0..block_size-1``."""
    array = _whole_array(position_ids, "position_ids")
    if array.shape != shape:
        raise InputError(f"position_ids must have shape {shape}, got {array.shape}")
    if array.min() < 0:
        raise InputError(
            f"position_ids must be >= 0 (a row's first real token is position 0), got "
            f"{int(array.min())}"
        )
    if array.max() >= block_size:
        raise InputError(
            f"a sequence of {int(array.max()) + 1} tokens exceeds the context window "
            f"(block_size={block_size}); generation keeps the last {block_size} tokens, "
            "forward() does not crop"
        )
    return array.astype(np.int64)


def check_past(past: Any, config: GPTConfig, batch: int, past_dtype: Any = np.float32) -> int:
    """The length of ``past`` (keys and values of every layer), or an :class:`InputError`.

    Each key and value must be ``past_dtype`` (float32, or float16 for a float16 export)
    ``(batch, n_head, past_length, head_size)`` with one ``past_length`` for all: what the
    previous :meth:`OnnxGPT.forward` call returned.
    """
    if not isinstance(past, Sequence) or len(past) != config.n_layer:
        got = f"{len(past)} layers" if isinstance(past, Sequence) else type(past).__name__
        raise InputError(f"past must hold {config.n_layer} (key, value) pairs, got {got}")
    lengths, want = set(), np.dtype(past_dtype)
    for i, pair in enumerate(past):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise InputError(f"past[{i}] must be a (key, value) pair of arrays")
        for name, array in zip(("key", "value"), pair, strict=True):
            shape, dtype = np.shape(array), getattr(array, "dtype", None)
            if len(shape) != 4 or (shape[0], shape[1], shape[3]) != (
                batch,
                config.n_head,
                config.head_size,
            ):
                raise InputError(
                    f"past[{i}] {name} has shape {shape}; this model needs (batch, n_head, "
                    f"past, head_size) = ({batch}, {config.n_head}, past, {config.head_size})"
                )
            if dtype != want:
                raise InputError(
                    f"past[{i}] {name} is {dtype}, not {want}: pass the past that "
                    "forward() returned, unchanged"
                )
            lengths.add(shape[2])
    if len(lengths) > 1:
        raise InputError(f"past keys and values have different lengths {sorted(lengths)}")
    return lengths.pop()


def check_prompt_ids(ids: Any, vocab_size: int) -> list[int]:
    """A prompt's ids as a list: at least one, whole numbers in the vocabulary."""
    ids = list(ids)
    if not ids:
        raise InputError(
            "generation needs at least one prompt token (an empty text prompt starts from "
            'the tokenizer\'s start token: use generate("") or prompt_ids(tokenizer, ""))'
        )
    if not all(is_whole(i) for i in ids):
        raise InputError(f"prompt token ids must be whole numbers, got {ids[:5]}")
    check_token_ids(ids, vocab_size)
    return ids


# Intra-op threads when the caller does not say. Measured on the 2-core development machine
# (`python scripts/bench_infer.py --session-options`, README): one thread decodes about 2x
# faster than onnxruntime's own default (one thread per core, spinning while idle) at
# batch 1 and 8, and processes a prompt faster, whenever other processes want the cores
# too (and 1.1x faster than two threads that do not spin); a decode step of these models is
# a few hundred operators of microseconds each, too short to split across threads.
# onnxruntime-genai runs one intra-op thread unless told otherwise, too. The other
# SessionOptions (graph optimization level, memory pattern, arena) made no difference
# beyond the noise there and keep onnxruntime's defaults.
DEFAULT_THREADS = 1

# How far generation's in-place graph may be from the exported one before OnnxGPT keeps the
# exported one (OnnxGPT._agrees_in_place), relative to the largest |logit|. float32 differs
# by the order of summation (measured <= 6e-7); float16 and int8 by their rounding, so each
# graph is within its precision's bound of the float64 reference (tests/test_export_precision.py:
# 2e-3 and 5e-2) and the two within twice that (the in-place graph of a float16 export
# computes in float32 on its float16 weights, so only the exported graph's rounding counts).
# int8 rounds each call's activations on one scale for the whole batch, which padding moves:
# measured 2.4e-2 on a padded batch.
IN_PLACE_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "int8": 1e-1}


def make_session(model: str | Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session for a model file (or its serialized bytes).

    ``threads``: intra-op threads (default :data:`DEFAULT_THREADS`; ``mlxgpt-ort
    --threads``); on a machine with idle cores, more may prefill long prompts faster.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or DEFAULT_THREADS
    options.log_severity_level = 3  # errors only: no warnings about unused initializers
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def find_model_file(folder: Path) -> Path:
    """The folder's ONNX file (:data:`MODEL_FILES`, or ``model.onnx`` in a legacy folder).

    Raises :class:`ExportFolderError` naming what is missing when the folder is incomplete.
    """
    if not folder.is_dir():
        raise ExportFolderError(
            f"export folder {folder} does not exist: create it with "
            "`mlxgpt export CKPT_DIR OUT_DIR`"
        )
    found = [name for name in MODEL_FILES.values() if (folder / name).is_file()]
    model_path = folder / (found[0] if found else MODEL_FILE)
    if not model_path.is_file() and (folder / LEGACY_MODEL_FILE).is_file():
        model_path = folder / LEGACY_MODEL_FILE
    missing = [name for name in FOLDER_FILES if not (folder / name).is_file()]
    if model_path.is_file() and MODEL_FILE in missing:
        missing.remove(MODEL_FILE)
    if missing:
        raise ExportFolderError(
            f"export folder {folder} is incomplete: missing {', '.join(missing)} ({REEXPORT})"
        )
    return model_path


def read_folder_config(folder: Path) -> GPTConfig:
    """The GPTConfig of an export folder's ``config.json``.

    Today's folders hold a Hugging Face GPT-2 config with the GPTConfig under ``"mlxgpt"``;
    the GPT-2 keys must still describe the same shape (clients read those). Legacy folders
    hold the GPTConfig itself.
    """
    path = folder / CONFIG_FILE
    values = read_json(path)
    if MLXGPT_KEY not in values and "model_type" in values:
        raise ExportFolderError(
            f"{path} has no {MLXGPT_KEY!r} key: this folder was not written by `mlxgpt export` "
            f"({REEXPORT})"
        )
    try:
        config = gpt_config_from_dict(values.get(MLXGPT_KEY, values))
    except ConfigError as err:
        raise ExportFolderError(f"{path} is invalid: {err} ({REEXPORT})") from None
    if MLXGPT_KEY in values:
        mismatches = shape_mismatches(values, config)
        if mismatches:
            raise ExportFolderError(
                f"{path}: the Hugging Face keys disagree with its {MLXGPT_KEY!r} config "
                f"({'; '.join(mismatches)}): was it edited? {REEXPORT}"
            )
    return config


def check_recorded_config(
    session: ort.InferenceSession, config: GPTConfig, config_path: Path, model_path: Path
) -> None:
    """Raise :class:`ExportFolderError` if ``config`` is not the one the model was exported with.

    The exporter records the GPTConfig in the model's ``model_config`` metadata; a
    ``config.json`` edited afterwards (say ``n_head``) would make the runtime split heads
    differently from the graph, so it is refused with the differing keys named.
    """
    recorded = session.get_modelmeta().custom_metadata_map.get("model_config")
    if recorded is None:
        return  # not recorded: the input-name check in OnnxGPT still guards the shape
    try:
        expected = json.loads(recorded)
    except json.JSONDecodeError:
        raise ExportFolderError(f"{model_path}: its model_config metadata is corrupt") from None
    actual = dataclasses.asdict(config)
    differing = [
        f"{key} is {actual.get(key)!r} in {config_path.name} but {expected.get(key)!r} in "
        f"{model_path.name}"
        for key in sorted(set(expected) | set(actual))
        if actual.get(key) != expected.get(key)
    ]
    if differing:
        raise ExportFolderError(
            f"{config_path} does not match the model it was exported with: "
            f"{'; '.join(differing)}. Undo the edit, or {REEXPORT}"
        )


def unchecked_run(session: ort.InferenceSession) -> Callable[[list[str], dict], list]:
    """``session.run`` minus the Python wrapper's own checks of each call's feed.

    ``InferenceSession.run`` checks, on every call, that every graph input is fed (reading
    each input's name and type through pybind) and whether any feed is an OrtValue of
    another session, before calling the C++ session it keeps as ``_sess``: ~7 us per call,
    several percent of a small model's decode step. :meth:`OnnxGPT.forward` (after its own
    checks) and the generation loops always feed every input, as numpy arrays, so they call
    the C++ session directly; where an onnxruntime version has no ``_sess`` with a ``run``,
    the public method is used.
    """
    inner = getattr(session, "_sess", None)
    if inner is None or not callable(getattr(inner, "run", None)):
        return session.run
    return lambda outputs, feeds: inner.run(outputs, feeds, None)


class _Decoder:
    """The generation loops' way to run the exported graph (where there is no in-place one,
    :class:`_InPlaceDecoder`): a KV cache that stays as onnxruntime made it.

    :meth:`OnnxGPT.forward` checks every argument because anyone may call it with anything.
    The loops pass only what they built themselves -- prompt ids checked once at the call,
    sampled ids (always inside the vocabulary), 0/1 masks, positions the loop keeps inside
    the window by sliding it first -- and the ``present.*`` arrays of the previous run, so
    this path checks nothing again. onnxruntime's ``run`` wraps C-contiguous numpy inputs
    and returns outputs as numpy arrays over its own buffers, both without a copy: each
    step's ``present.*`` become the next step's ``past_key_values.*`` by reference, and no
    step copies the cache outside the graph (the graph's Concat of past and new keys is the
    one copy; ``scripts/bench_infer.py --binding`` measures IO binding of the same values
    and preallocated output buffers against it).

    Row ``r``'s mask is 0 on its left padding and 1 everywhere after, so the mask of any
    step is the first ``length`` columns of one preallocated ``(batch, block_size)`` array.
    """

    def __init__(self, model: OnnxGPT, batch: int):
        config = model.config
        self._run, self._outputs = model._run, model._outputs
        self._past_names = [name for i in range(config.n_layer) for name in sig.past_names(i)]
        empty = np.zeros((batch, config.n_head, 0, config.head_size), model.past_dtype)
        self._empty = dict.fromkeys(self._past_names, empty)
        self._mask = np.ones((batch, config.block_size), np.int64)
        self._feeds: dict[str, np.ndarray] = {}
        self._last_position = np.zeros((batch, 1), np.int64)
        self.length = 0  # tokens in the cache (padding included)

    def start(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Forget the cache and run left-padded ``ids`` ``(batch, n)``: last-position logits."""
        self._mask[:, : mask.shape[1]] = mask
        self._mask[:, mask.shape[1] :] = 1
        self._feeds = dict(self._empty)
        self.length = 0
        return self._forward(ids, sig.position_ids_from_mask(mask))

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Run ``ids`` ``(batch, n)`` after the cache (every row real): last-position logits."""
        new = ids.shape[1]
        positions = self._last_position + (1 if new == 1 else np.arange(1, new + 1))
        return self._forward(ids, positions)

    def _forward(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        length = self.length + ids.shape[1]
        feeds = self._feeds
        feeds[sig.INPUT_IDS] = ids
        feeds[sig.ATTENTION_MASK] = np.ascontiguousarray(self._mask[:, :length])
        feeds[sig.POSITION_IDS] = positions
        logits, *present = self._run(self._outputs, feeds)
        feeds.update(zip(self._past_names, present, strict=True))
        self.length, self._last_position = length, positions[:, -1:]
        return logits[:, -1]

    def cache(self) -> list[np.ndarray]:
        """Every layer's keys and values ``(batch, n_head, length, head_size)``, in
        :func:`~mlxgpt_export.signature.past_names` order (left-padded as the rows came)."""
        return [self._feeds[name] for name in self._past_names]


class _InPlaceDecoder:
    """:class:`_Decoder` on the in-place graph (:mod:`mlxgpt_export.in_place`): no step copies
    the KV cache, inside the graph or out.

    Every layer's keys and values live in two buffers of ``block_size`` positions, allocated
    once per generation (``np.zeros``: pages the graph never writes are never touched, so a
    short generation does not pay for the whole window) and bound, through onnxruntime's IO
    binding, as both the layer's past and its present: the graph writes each new position
    where it belongs and reads the row's first ``length`` positions. A row's tokens sit at
    positions ``[0, length)``, so :meth:`start` turns the loops' left padding into right
    padding (each row's tokens moved to the front; what lies beyond a row's length is never
    read, and its next token overwrites it). The window never overflows: the loops slide it
    by calling :meth:`start` again.

    A prompt runs on the exported graph (:class:`_Decoder`), whose keys and values are then
    copied into the buffers, each row's to the front: onnxruntime's operator computes a
    prompt's attention far more slowly than the exported graph's batched products (measured
    on the shakespeare-char shape, 8 x 128 tokens: 94 ms of a 347 ms prompt, which takes
    269 ms on the exported graph), and the copy is one pass over the prompt's cache.
    """

    def __init__(self, model: OnnxGPT, batch: int, session: ort.InferenceSession):
        config = model.config
        self._model, self._batch = model, batch
        self._binding = session.io_binding()
        inner = getattr(session, "_sess", None)  # without the Python wrapper's checks
        if inner is not None and callable(getattr(inner, "run_with_iobinding", None)):
            self._run = lambda: inner.run_with_iobinding(self._binding._iobinding, None)
        else:
            self._run = lambda: session.run_with_iobinding(self._binding)
        shape = (batch, config.n_head, config.block_size, config.head_size)
        types = {i.name: i.type for i in session.get_inputs()}
        dtype = PAST_DTYPES.get(types[sig.past_names(0)[0]], np.float32)  # float32 if widened
        self._buffers = []  # bound by address: they must live as long as the binding
        for i in range(config.n_layer):
            for past, present in zip(sig.past_names(i), sig.present_names(i), strict=True):
                buffer = np.zeros(shape, dtype)
                self._binding.bind_cpu_input(past, buffer)
                self._binding.bind_output(
                    present, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data
                )
                self._buffers.append(buffer)
        self._vocab = config.vocab_size
        self._logits: dict[tuple[int, int], np.ndarray] = {}  # one buffer per (batch, new)
        self._lengths = np.zeros(batch, np.int64)  # tokens of each row in the cache
        self.length = 0  # the longest row's

    def start(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Forget the cache and run left-padded ``ids`` ``(batch, n)``: last-position logits."""
        prompt = _Decoder(self._model, self._batch)
        logits = prompt.start(ids, mask)
        lengths = mask.sum(axis=1).astype(np.int64)
        width = ids.shape[1]
        for buffer, cache in zip(self._buffers, prompt.cache(), strict=True):
            for row, length in enumerate(lengths.tolist()):
                buffer[row, :, :length] = cache[row, :, width - length :]
        self._lengths, self.length = lengths, int(lengths.max())
        return logits

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Run ``ids`` ``(batch, n)`` after the cache (every row real): last-position logits.

        The operator takes several new tokens after a past only at batch 1; a batch runs
        them one at a time (the loops only ever extend a batch by one token).
        """
        batch, new = ids.shape
        if batch > 1 and new > 1:
            for column in range(new - 1):
                self.extend(ids[:, column : column + 1])
            ids, new = ids[:, -1:], 1
        positions = self._lengths[:, None] + np.arange(new)
        return self._forward(ids, positions, self._lengths + new)[:, -1].copy()

    def _forward(self, ids: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        binding, longest = self._binding, int(lengths.max())
        binding.bind_cpu_input(sig.INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input(sig.POSITION_IDS, positions)
        binding.bind_cpu_input(SEQLENS_K, (lengths - 1).astype(np.int32))
        binding.bind_cpu_input(TOTAL_LENGTH, np.array(longest, np.int32))
        logits = self._logits.get(ids.shape)
        if logits is None:
            logits = np.empty((*ids.shape, self._vocab), np.float32)
            self._logits[ids.shape] = logits
        binding.bind_output(sig.LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self._run()
        self._lengths, self.length = lengths, longest
        return logits


def next_tokens(
    logits: np.ndarray, params: SamplingParams, rngs: Sequence[np.random.Generator]
) -> list[int]:
    """Every row's next token: :func:`~mlxgpt.sampling.sample_next` of each row, each with
    its rng (batched by :func:`~mlxgpt.sampling.sample_rows`)."""
    return sample_rows(logits, [params] * len(rngs), rngs)


class OnnxGPT:
    """An exported mlxgpt model in an onnxruntime session, with its tokenizer and defaults."""

    def __init__(
        self,
        session: ort.InferenceSession,
        config: GPTConfig,
        tokenizer: Tokenizer | None = None,
        generation: dict[str, Any] | None = None,
    ):
        expected = sig.input_names(config.n_layer)
        actual = [i.name for i in session.get_inputs()]
        if actual != expected:
            raise ExportFolderError(
                f"the ONNX model's inputs {actual[:5]}... do not match config.json "
                f"(expected {expected[:5]}...): was it exported by mlxgpt for this config?"
            )
        self.session = session
        self.config = config
        self.tokenizer = tokenizer
        self.generation = generation or {}
        self.model_path: Path | None = None  # the file load() read, if any
        self.folder: Path | None = None  # the export folder load() read, if any
        # Generation decodes on the in-place graph of model_path (mlxgpt_export.in_place),
        # made on first use; False: decode on the exported graph, as forward() runs it.
        self.in_place = True
        self.threads: int | None = None
        self._in_place_session: ort.InferenceSession | None = None
        self._in_place_tried = False
        self._outputs = sig.output_names(config.n_layer)
        self._run = unchecked_run(session)
        # past/present: float32, or float16 in a float16 export (the graph's input type)
        self.past_dtype = PAST_DTYPES.get(session.get_inputs()[3].type, np.float32)

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> OnnxGPT:
        """Load an export folder written by ``mlxgpt export`` (:mod:`mlxgpt_export.exporter`).

        Reads the model file (``onnx/model.onnx``, ``model_fp16.onnx`` or
        ``model_quantized.onnx`` with any ``<file>_data`` beside it, or a legacy folder's
        ``model.onnx``), ``config.json``, ``tokenizer.json`` and ``generation_config.json``,
        and checks that the config is the one recorded in the model's metadata when it was
        exported.
        """
        folder = Path(folder)
        model_path = find_model_file(folder)
        try:  # the folder holds a checkpoint's tokenizer file: same reader
            config = read_folder_config(folder)
            tokenizer = read_tokenizer(folder, config)
            generation = read_json(folder / GENERATION_FILE)
        except CheckpointError as err:
            raise ExportFolderError(str(err)) from None
        try:
            session = make_session(model_path, threads)
        except Exception as err:  # onnxruntime raises its own exception types
            raise ExportFolderError(f"{model_path} cannot be loaded: {err}") from None
        check_recorded_config(session, config, folder / CONFIG_FILE, model_path)
        model = cls(session, config, tokenizer, generation)
        model.model_path, model.folder, model.threads = model_path, folder, threads
        return model

    def in_place_session(self) -> ort.InferenceSession | None:
        """The session of the in-place graph that generation decodes on, made on first use;
        ``None`` where there is none (:attr:`in_place` off, a model not loaded from a file,
        or :func:`~mlxgpt_export.in_place.write_in_place_model` could not rewrite the file, e.g.
        without the ``onnx`` package, or the rewritten graph failed its check against the
        exported one, :meth:`_agrees_in_place`): generation then decodes on the exported graph.

        It holds a second copy of the weights beside :attr:`session` (which
        :meth:`forward` and the server's batching engine run).
        """
        if not self.in_place or self.model_path is None:
            return None
        if not self._in_place_tried:
            self._in_place_tried = True
            session = None
            with tempfile.TemporaryDirectory(prefix="mlxgpt-in-place-") as scratch:
                path = Path(scratch) / "model.onnx"  # removed as soon as the session holds it
                try:
                    if write_in_place_model(self.model_path, self.config, path):
                        session = make_session(path, self.threads)
                except Exception:  # e.g. an onnxruntime without the contrib operator
                    pass  # no in-place graph: generation keeps the exported one
            if session is not None and self._agrees_in_place(session):
                self._in_place_session = session
        return self._in_place_session

    def _agrees_in_place(self, session: ort.InferenceSession) -> bool:
        """Whether ``session`` gives the exported graph's logits for two steps after a
        left-padded batch of two, and for a chunk of two tokens after one row's prompt (the
        operator's other path), within :data:`IN_PLACE_TOLERANCE` of the largest |logit|: a
        check, once per model, that this onnxruntime's operator does what the rewrite
        assumes (tested with onnxruntime 1.32)."""
        vocab = self.config.vocab_size
        if self.config.block_size < 6:  # the check's 6 positions do not fit: no in-place graph
            return False
        ids = np.array([[1, 2, 3, 4], [0, 0, 5, 6]]) % vocab
        mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
        decoder = _InPlaceDecoder(self, 2, session)
        logits, past = self.forward(ids, mask)
        got, expected = [decoder.start(ids, mask)], [logits[:, -1]]
        for token in (7, 8):  # two decode steps after the padded prompt
            step = np.array([[token], [token + 1]]) % vocab
            mask = np.concatenate([mask, [[1], [1]]], axis=1)
            logits, past = self.forward(step, mask, past=past)
            got.append(decoder.extend(step))
            expected.append(logits[:, -1])
        prompt, chunk = ids[:1, :3], (ids[:1, 2:] + 1) % vocab
        one = _InPlaceDecoder(self, 1, session)
        one.start(prompt, np.ones_like(prompt))
        got.append(one.extend(chunk))  # two new tokens after a past, in one call
        expected.append(self.forward(np.concatenate([prompt, chunk], axis=1))[0][:, -1])
        scale = max(1.0, *(float(np.abs(e).max()) for e in expected))
        worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
        meta = self.session.get_modelmeta().custom_metadata_map
        precision = "int8" if meta.get("quantization") == "int8" else meta.get("dtype", "float32")
        return worst <= IN_PLACE_TOLERANCE.get(precision, 0.0) * scale

    def _decoder(self, batch: int) -> _Decoder | _InPlaceDecoder:
        """The generation loops' decoder: in place where :meth:`in_place_session` exists."""
        session = self.in_place_session()
        return _Decoder(self, batch) if session is None else _InPlaceDecoder(self, batch, session)

    # -- the forward pass -------------------------------------------------------------------
    def empty_past(self, batch: int) -> Past:
        """The past for a first step: keys and values of length 0."""
        shape = (batch, self.config.n_head, 0, self.config.head_size)
        empty = np.zeros(shape, dtype=self.past_dtype)
        return [(empty, empty) for _ in range(self.config.n_layer)]

    def forward(
        self,
        input_ids: np.ndarray | Sequence[Sequence[int]],
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        past: Past | None = None,
    ) -> tuple[np.ndarray, Past]:
        """Logits ``(batch, new, vocab)`` for ``input_ids`` ``(batch, new)`` after ``past``.

        ``attention_mask`` ``(batch, past + new)`` defaults to all ones; ``position_ids``
        default to :func:`~mlxgpt_export.signature.position_ids_from_mask` of it. Returns the logits
        and the new past (``present.*``) to pass to the next call.
        """
        ids = check_input_ids(input_ids, self.config.vocab_size)
        batch, new = ids.shape
        past = self.empty_past(batch) if past is None else past
        past_len = check_past(past, self.config, batch, self.past_dtype)
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + new), dtype=np.int64)
        attention_mask = check_attention_mask(attention_mask, (batch, past_len + new))
        if position_ids is None:
            position_ids = sig.position_ids_from_mask(attention_mask)[:, -new:]
        position_ids = check_position_ids(position_ids, (batch, new), self.config.block_size)
        feeds: dict[str, np.ndarray] = {
            sig.INPUT_IDS: ids,
            sig.ATTENTION_MASK: attention_mask,
            sig.POSITION_IDS: position_ids,
        }
        for i, (key, value) in enumerate(past):
            key_name, value_name = sig.past_names(i)
            feeds[key_name], feeds[value_name] = key, value
        logits, *present = self._run(self._outputs, feeds)  # every input fed, all numpy
        return logits, list(zip(present[0::2], present[1::2], strict=True))

    # -- generation ---------------------------------------------------------------------------
    def cached_step(self) -> StepFn:
        """A step for :func:`mlxgpt.sampling.generate_ids` that keeps the KV cache.

        Checks the ids it is given, as :meth:`forward` does (:meth:`generate_ids`, which
        checks its prompt once, runs the same step without the checks).
        """
        step = self._cached_step()
        vocab, block = self.config.vocab_size, self.config.block_size

        def checked(new_ids: Sequence[int], past_len: int) -> np.ndarray:
            ids = check_input_ids([list(new_ids)], vocab)
            positions = np.arange(past_len, past_len + ids.shape[1])[None]
            check_position_ids(positions, ids.shape, block)
            return step(ids, past_len)

        return checked

    def _cached_step(self) -> StepFn:
        """:meth:`cached_step` for checked ids: the KV cache stays in a decoder."""
        decoder = self._decoder(1)

        def step(new_ids: Sequence[int], past_len: int) -> np.ndarray:
            ids = np.array(new_ids, dtype=np.int64).reshape(1, -1)
            if past_len == 0:
                return decoder.start(ids, np.ones_like(ids))[0]
            assert decoder.length == past_len, "cache out of sync"
            return decoder.extend(ids)[0]

        return step

    def recompute_step(self) -> StepFn:
        """A step that runs the whole sequence again every time (no cache; for testing)."""
        return sampling.recompute_step(lambda ids: self.forward([ids])[0][0, -1])

    def release_session(self) -> None:
        """Free the onnxruntime session and the weights it holds; the config, tokenizer and
        settings stay. For a process that only prepares requests while another one runs the
        model (``mlxgpt-ort serve`` and its engine process): running the graph afterwards
        raises :class:`InputError`."""

        def released(outputs: list[str], feeds: dict) -> list:
            raise InputError("this model's onnxruntime session was released: load it again")

        self.session, self._run = None, released
        self._in_place_session, self.in_place = None, False

    def default_settings(self) -> tuple[SamplingParams, int]:
        """Sampling settings and token budget of the folder's ``generation_config.json``.

        Read with Hugging Face's meaning (:func:`mlxgpt.sampling.from_generation_config`),
        so the folder means the same here as in transformers; no seed.
        """
        try:
            return sampling.from_generation_config(self.generation)
        except ValueError as err:
            raise ExportFolderError(f"generation_config.json: {err}") from None

    def default_params(self) -> SamplingParams:
        return self.default_settings()[0]

    def _max_tokens(self, max_tokens: int | None) -> int:
        if max_tokens is None:
            return self.default_settings()[1]
        check_max_tokens(max_tokens, InputError)
        return max_tokens

    def generate_ids(
        self,
        ids: Sequence[int],
        max_tokens: int | None = None,
        params: SamplingParams | None = None,
        use_cache: bool = True,
    ) -> Iterator[int]:
        """Yield new token ids for the prompt ``ids`` (see the module docstring)."""
        ids = check_prompt_ids(ids, self.config.vocab_size)
        step = self._cached_step() if use_cache else self.recompute_step()
        return generate_ids(
            step,
            ids,
            self._max_tokens(max_tokens),
            self.config.block_size,
            params or self.default_params(),
            stop_id=self.eos_id,
        )

    @property
    def eos_id(self) -> int | None:
        """The end-of-text token that stops generation (``None``: none, or no tokenizer)."""
        return self.tokenizer.eos_id if self.tokenizer is not None else None

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError("this model was loaded without a tokenizer: pass token ids")
        return self.tokenizer

    def generate(
        self, prompt: str, max_tokens: int | None = None, params: SamplingParams | None = None
    ) -> Iterator[str]:
        """Stream the continuation of ``prompt`` piece by piece (the prompt is not repeated)."""
        tokenizer = self._need_tokenizer()
        ids = prompt_ids(tokenizer, prompt)
        return stream_text(tokenizer, self.generate_ids(ids, max_tokens, params))

    @staticmethod
    def _start(decoder: _Decoder | _InPlaceDecoder, contexts: list[list[int]]) -> np.ndarray:
        """Run left-padded ``contexts`` from an empty cache: last-position logits."""
        width = max(len(c) for c in contexts)
        ids = np.zeros((len(contexts), width), dtype=np.int64)  # pad id 0: masked anyway
        mask = np.zeros((len(contexts), width), dtype=np.int64)
        for row, context in enumerate(contexts):
            ids[row, width - len(context) :] = context
            mask[row, width - len(context) :] = 1
        return decoder.start(ids, mask)

    def generate_batch_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | None = None,
        params: SamplingParams | None = None,
    ) -> Iterator[list[int | None]]:
        """Generate for several prompts at once; yield each step's new token of every row.

        A row that has drawn the end-of-text token (:attr:`eos_id`) is finished: from then
        on its entry is ``None`` (the end-of-text token itself is not yielded), and the
        generator stops once every row is finished or ``max_tokens`` steps are done.

        Prompts of different lengths are left-padded (``attention_mask`` 0 on the padding,
        positions from :func:`~mlxgpt_export.signature.position_ids_from_mask`). Row ``r`` draws
        from its own ``numpy.random.default_rng(params.seed)``, so it gets the tokens that
        generating ``prompts[r]`` alone with the same seed gives (the same seed therefore
        gives identical rows for identical prompts). The context window is handled per row
        as in :func:`mlxgpt.sampling.generate_ids`: once any row no longer fits, every step
        recomputes all rows from their last ``block_size`` tokens. Bad arguments raise
        :class:`~mlxgpt_export.errors.InputError` at the call, before anything runs.
        """
        params = params or self.default_params()
        max_tokens = self._max_tokens(max_tokens)
        if not prompts:
            raise InputError("batched generation needs at least one prompt")
        vocab, block = self.config.vocab_size, self.config.block_size
        contexts = [crop_prompt(check_prompt_ids(p, vocab), block) for p in prompts]
        return self._batch_steps(contexts, max_tokens, params)

    def _batch_steps(
        self, contexts: list[list[int]], max_tokens: int, params: SamplingParams
    ) -> Iterator[list[int | None]]:
        """The loop of :meth:`generate_batch_ids`, for arguments it has checked."""
        block = self.config.block_size
        rngs = [params.rng() for _ in contexts]
        if max_tokens == 0:
            return
        decoder = self._decoder(len(contexts))
        logits = self._start(decoder, contexts)
        longest = max(len(c) for c in contexts)
        finished = [False] * len(contexts)
        for i in range(max_tokens):
            tokens = next_tokens(logits, params, rngs)
            finished = [f or t == self.eos_id for f, t in zip(finished, tokens, strict=True)]
            if all(finished):
                return
            yield [None if done else token for done, token in zip(finished, tokens, strict=True)]
            if i == max_tokens - 1:
                break
            for context, token in zip(contexts, tokens, strict=True):
                context.append(token)
            longest += 1
            if longest > block:  # a row slides: recompute everything
                contexts = [c[-block:] for c in contexts]
                longest = block
                logits = self._start(decoder, contexts)
            else:
                logits = decoder.extend(np.array(tokens, dtype=np.int64)[:, None])

    def generate_batch(
        self,
        prompts: Sequence[str],
        max_tokens: int | None = None,
        params: SamplingParams | None = None,
    ) -> list[str]:
        """The continuation of every prompt (one left-padded batch; see generate_batch_ids)."""
        tokenizer = self._need_tokenizer()
        rows: list[list[int]] = [[] for _ in prompts]
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        for tokens in self.generate_batch_ids(ids, max_tokens, params):
            for row, token in zip(rows, tokens, strict=True):
                if token is not None:
                    row.append(token)
        return [tokenizer.decode(row) for row in rows]
