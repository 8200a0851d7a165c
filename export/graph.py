"""The GPT forward pass as one ONNX graph, built from numpy weights with ``onnx.helper``.

The graph computes exactly what :class:`mlxgpt.model.GPT` computes, for prompt processing
and for decoding with a KV cache alike (inputs and outputs: :mod:`mlxgpt_export.signature`)::

    x = wte[input_ids] + wpe[position_ids]
    bias = attention_bias(input_ids, attention_mask)          # once, shared by all layers
    for each layer i:
        h = LayerNorm(x);  q, k, v = split(h @ c_attn)
        present.i.key/value = concat(past_key_values.i.key/value, k/v)   # along time
        x = x + c_proj(attention(q, present.i.key, present.i.value, bias))
        x = x + c_proj(gelu(LayerNorm(x) @ c_fc))
    logits = LayerNorm(x) @ wte^T                              # tied head

Two forms of ``attention(...)``, chosen by ``attention=``:

* ``"portable"`` (opset 17, the default): ``Softmax(q k^T / sqrt(head_size) + bias) v``
  written with MatMul/Add/Softmax; runs on any ONNX runtime.
* ``"fused"`` (opset 23): the standard ONNX ``Attention`` operator, which also appends the
  new keys/values to the past itself. It is fed the same explicit ``bias`` (``is_causal``
  stays 0, so the mask rule lives in one place).

Weights: the checkpoint stores Linear weights as ``(out, in)``; the graph stores them
transposed, ``(in, out)``, under ``<name>_t`` so each projection is one MatMul. The token
embedding ``wte.weight`` is stored once and used twice: by the input Gather and, through
a Transpose, by the LM head (``separate_head=True`` stores the head's matrix ``wte^T`` as
its own initializer instead, so int8 quantization, which only quantizes a MatMul whose
weight is an initializer, can reach the head). Intermediate tensors are named
``/h.0/attn/...`` so the graph reads well in Netron.

Precision, chosen by ``dtype=`` (:data:`DTYPES`):

* ``"float32"``: everything float32.
* ``"float16"`` (for GPU runtimes): weights, activations, the residual stream and
  ``past``/``present`` are float16. What stays float32: LayerNorm statistics (the
  operator's ``stash_type``), the attention scores, mask and softmax of the portable
  form (scores are cast up before the mask is added, probabilities cast down after), the
  fused form's softmax (``softmax_precision``), and the ``logits`` output (the head's
  float16 result cast up, so every client samples from float32 as before).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mlxgpt.config import LAYER_NORM_EPS, GPTConfig
from mlxgpt_export import signature as sig

ATTENTION_FORMS = ("portable", "fused")
OPSETS = {"portable": 17, "fused": 23}
# The oldest IR version that carries each opset, so older runtimes can load the file.
IR_VERSIONS = {17: 8, 23: 11}
DTYPES = ("float32", "float16")
MASK_MIN = float(np.finfo(np.float32).min)
# The fused form's float16 mask: half the most negative finite float16 (see attention_bias).
MASK_MIN_FLOAT16 = float(np.finfo(np.float16).min) / 2
HEAD_WEIGHT = "lm_head.weight_t"  # the head's own initializer when separate_head=True


class _Graph:
    """Collects nodes and initializers; each ``op`` call adds one node and names its outputs.

    ``dtype`` is the precision of weights and float constants (numpy ``float32`` or
    ``float16``); a constant may ask for another type explicitly. Initializers are kept as
    numpy arrays (views of the checkpoint's weights, transposed lazily) with the type they
    will be stored in, and only serialized into the model at the end, one at a time
    (:func:`_add_initializers`).
    """

    def __init__(self, weights: dict[str, np.ndarray], dtype: str = "float32"):
        self.weights = weights
        self.dtype = np.dtype(dtype)
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, tuple[np.ndarray, np.dtype]] = {}

    @property
    def half(self) -> bool:
        return self.dtype == np.float16

    def constant(self, name: str, value: Any, dtype: Any = None) -> str:
        if name not in self.initializers:
            stored = self.dtype if dtype is None else np.dtype(dtype)
            self.initializers[name] = (np.asarray(value, stored), stored)
        return name

    def weight(self, name: str, transpose: bool = False, stored: str | None = None) -> str:
        """A checkpoint weight as an initializer (a Linear weight transposed to (in, out))."""
        stored = stored or (f"{name}_t" if transpose else name)
        if stored not in self.initializers:
            array = self.weights[name].T if transpose else self.weights[name]  # a view
            self.initializers[stored] = (array, self.dtype)
        return stored

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def op_multi(
        self, op_type: str, inputs: list[str], outputs: list[str], **attrs: Any
    ) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=outputs[0], **attrs))
        return outputs


def attention_bias(g: _Graph, dtype: Any = np.float32) -> str:
    """The model's one attention mask: ``(batch, 1, new, past + new)``, added to scores.

    Query ``i`` (of the ``new = sequence_length`` tokens of this call) sits at position
    ``past + i``; it may see key ``j`` of the ``past + new = total_sequence_length`` keys iff

    * ``j <= past + i`` — causal, *bottom-right* aligned, so a decode step (``new = 1``)
      sees the whole past and a prompt chunk after a past sees the past and its own
      earlier tokens; the lengths come from the input shapes, so one graph serves all
      calls; and
    * ``attention_mask[b, j] == 1`` — the key is not padding.

    Both conditions are booleans, combined with And, and turned into an additive bias
    once: ``0`` where visible, the most negative *finite* float32 where not. Never
    ``-inf``: a query that sees no key at all (a left-padding position, or a batch row
    whose attention_mask is all zeros) would get ``softmax(-inf, ..., -inf) = NaN``, and
    from the second layer on that NaN reaches every query through the padded positions'
    keys and values (``0 * NaN = NaN``). With a finite minimum such a row gets finite,
    meaningless weights that nobody reads. (Adding two finite-minimum masks would also
    overflow to ``-inf``: hence booleans first, one conversion at the end.)

    ``dtype`` is the type of the scores it is added to: float32 (the float32 graph, and
    the float16 graph's portable form, whose scores are cast to float32 first), or float16
    for the float16 graph's fused form, whose ``Attention`` operator takes a mask of its
    inputs' type. There the value is *half* float16's most negative finite number
    (``MASK_MIN_FLOAT16`` = -32752): float16 arithmetic has so little headroom that the
    finite minimum -65504 plus any score of -16 or less rounds to ``-inf`` (float32's minimum
    absorbs any realistic score), while -32752 leaves room for scores down to -32752, and
    ``exp(-32752 + s)`` is still exactly 0 next to any visible key.
    """
    one, zero = g.constant("/mask/one", 1, np.int64), g.constant("/mask/zero", 0, np.int64)
    ids_shape = g.op("Shape", [sig.INPUT_IDS], "/mask/ids_shape")
    mask_shape = g.op("Shape", [sig.ATTENTION_MASK], "/mask/mask_shape")
    new_len = g.op("Gather", [ids_shape, one], "/mask/new_len")  # scalar
    total_len = g.op("Gather", [mask_shape, one], "/mask/total_len")  # scalar: past + new
    past_len = g.op("Sub", [total_len, new_len], "/mask/past_len")

    # causal: key position <= query position, queries being the last `new` positions
    query_pos = g.op("Range", [past_len, total_len, one], "/mask/query_pos")  # (new,)
    key_pos = g.op("Range", [zero, total_len, one], "/mask/key_pos")  # (total,)
    axis0 = g.constant("/mask/axis0", [0], np.int64)
    axis1 = g.constant("/mask/axis1", [1], np.int64)
    key_row = g.op("Unsqueeze", [key_pos, axis0], "/mask/key_row")  # (1, total)
    query_col = g.op("Unsqueeze", [query_pos, axis1], "/mask/query_col")  # (new, 1)
    causal = g.op("LessOrEqual", [key_row, query_col], "/mask/causal")  # (new, total)

    # padding: attention_mask != 0, broadcast over heads and queries
    not_padding = g.op("Cast", [sig.ATTENTION_MASK], "/mask/not_padding", to=TensorProto.BOOL)
    axes12 = g.constant("/mask/axes12", [1, 2], np.int64)
    not_padding = g.op("Unsqueeze", [not_padding, axes12], "/mask/not_padding_4d")  # (B,1,1,T)

    visible = g.op("And", [causal, not_padding], "/mask/visible")  # (batch, 1, new, total)
    lowest = MASK_MIN_FLOAT16 if np.dtype(dtype) == np.float16 else MASK_MIN
    zero_f = g.constant("/mask/zero_f", 0.0, dtype)
    min_f = g.constant("/mask/min_f", lowest, dtype)
    return g.op("Where", [visible, zero_f, min_f], "/mask/attention_bias")


def _layer_norm(g: _Graph, x: str, name: str, bias: bool) -> str:
    """LayerNorm; mean and variance in float32 whatever ``x``'s type (``stash_type`` 1)."""
    inputs = [x, g.weight(f"{name}.weight")] + ([g.weight(f"{name}.bias")] if bias else [])
    return g.op(
        "LayerNormalization",
        inputs,
        f"/{name}/out",
        axis=-1,
        epsilon=LAYER_NORM_EPS,
        stash_type=TensorProto.FLOAT,
    )


def _linear(g: _Graph, x: str, name: str, bias: bool) -> str:
    """``x @ W.T + b`` as in mlx.nn.Linear (W stored pre-transposed)."""
    y = g.op("MatMul", [x, g.weight(f"{name}.weight", transpose=True)], f"/{name}/matmul")
    return g.op("Add", [y, g.weight(f"{name}.bias")], f"/{name}/out") if bias else y


def _gelu(g: _Graph, x: str, scope: str, activation: str) -> str:
    """GELU as :class:`mlxgpt.model.MLP` computes it (opset 17 has no Gelu operator).

    ``"gelu"``: exact, ``0.5 x (1 + erf(x / sqrt 2))`` (``mlx.nn.gelu``).
    ``"gelu_tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
    (``mlx.nn.gelu_approx``, GPT-2's and Hugging Face's ``gelu_new``).
    """
    half, one = g.constant("/const/half", 0.5), g.constant("/const/one_f", 1.0)
    if activation == "gelu_tanh":
        cubic = g.constant("/const/gelu_cubic", 0.044715)
        sqrt_2_pi = g.constant("/const/sqrt_2_over_pi", math.sqrt(2 / math.pi))
        x3 = g.op("Mul", [g.op("Mul", [x, x], f"{scope}/x2"), x], f"{scope}/x3")
        inner = g.op("Add", [x, g.op("Mul", [x3, cubic], f"{scope}/cx3")], f"{scope}/inner")
        scaled = g.op("Mul", [inner, sqrt_2_pi], f"{scope}/scaled")
        squash = g.op("Tanh", [scaled], f"{scope}/tanh")
    else:
        inv_sqrt2 = g.constant("/const/inv_sqrt2", 1 / math.sqrt(2))
        squash = g.op("Erf", [g.op("Mul", [x, inv_sqrt2], f"{scope}/scaled")], f"{scope}/erf")
    one_plus = g.op("Add", [squash, one], f"{scope}/one_plus")
    half_x = g.op("Mul", [x, half], f"{scope}/half_x")
    return g.op("Mul", [half_x, one_plus], f"{scope}/out")


def _to_heads(g: _Graph, x: str, config: GPTConfig, name: str) -> str:
    """``(B, T, C)`` -> ``(B, n_head, T, head_size)``, as mlxgpt.model splits heads."""
    shape = g.constant("/const/heads_shape", [0, 0, config.n_head, config.head_size], np.int64)
    return g.op("Transpose", [g.op("Reshape", [x, shape], f"{name}_bthd")], name, perm=[0, 2, 1, 3])


def _portable_attention(
    g: _Graph, q: str, k: str, v: str, bias: str, i: int, config: GPTConfig
) -> str:
    scope = f"/h.{i}/attn"
    past_k, past_v = sig.past_names(i)
    present_k, present_v = sig.present_names(i)
    g.op("Concat", [past_k, _to_heads(g, k, config, f"{scope}/k_heads")], present_k, axis=2)
    g.op("Concat", [past_v, _to_heads(g, v, config, f"{scope}/v_heads")], present_v, axis=2)
    scale = g.constant("/const/attn_scale", 1 / math.sqrt(config.head_size))
    q_heads = _to_heads(g, q, config, f"{scope}/q_heads")
    q_scaled = g.op("Mul", [q_heads, scale], f"{scope}/q_scaled")  # as mlxgpt.model scales
    k_t = g.op("Transpose", [present_k], f"{scope}/k_t", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q_scaled, k_t], f"{scope}/scores")
    if g.half:  # mask and softmax in float32 (the bias is float32: see attention_bias)
        scores = g.op("Cast", [scores], f"{scope}/scores_f32", to=TensorProto.FLOAT)
    masked = g.op("Add", [scores, bias], f"{scope}/masked_scores")
    probs = g.op("Softmax", [masked], f"{scope}/probs", axis=-1)
    if g.half:
        probs = g.op("Cast", [probs], f"{scope}/probs_f16", to=TensorProto.FLOAT16)
    y = g.op("MatMul", [probs, present_v], f"{scope}/y_heads")  # (B, H, T, hs)
    y = g.op("Transpose", [y], f"{scope}/y_bthd", perm=[0, 2, 1, 3])
    shape = g.constant("/const/merge_shape", [0, 0, config.n_embd], np.int64)
    return g.op("Reshape", [y, shape], f"{scope}/y")


def _fused_attention(
    g: _Graph, q: str, k: str, v: str, bias: str, i: int, config: GPTConfig
) -> str:
    """ONNX ``Attention`` (opset 23) on 3-D q/k/v; it concatenates past and new keys itself.

    Fed the same additive bias as the portable form. (For a query that sees no key at all,
    onnxruntime's kernel outputs zeros where the portable form averages the masked values:
    both finite, both unused.) In a float16 graph the softmax runs in float32
    (``softmax_precision``).
    """
    scope = f"/h.{i}/attn"
    y = f"{scope}/y"
    precision = {"softmax_precision": TensorProto.FLOAT} if g.half else {}
    g.op_multi(
        "Attention",
        [q, k, v, bias, *sig.past_names(i)],
        [y, *sig.present_names(i)],
        q_num_heads=config.n_head,
        kv_num_heads=config.n_head,
        scale=1 / math.sqrt(config.head_size),
        is_causal=0,
        **precision,
    )
    return y


def _block(g: _Graph, x: str, i: int, config: GPTConfig, bias: str, attention: str) -> str:
    p = f"h.{i}"
    qkv = _linear(g, _layer_norm(g, x, f"{p}.ln_1", config.bias), f"{p}.attn.c_attn", config.bias)
    split = g.constant("/const/qkv_split", [config.n_embd] * 3, np.int64)
    q, k, v = g.op_multi("Split", [qkv, split], [f"/{p}/attn/{n}" for n in "qkv"], axis=-1)
    attend = _fused_attention if attention == "fused" else _portable_attention
    y = _linear(g, attend(g, q, k, v, bias, i, config), f"{p}.attn.c_proj", config.bias)
    x = g.op("Add", [x, y], f"/{p}/resid_attn")
    h = _linear(g, _layer_norm(g, x, f"{p}.ln_2", config.bias), f"{p}.mlp.c_fc", config.bias)
    gelu = _gelu(g, h, f"/{p}/mlp/gelu", config.activation)
    h = _linear(g, gelu, f"{p}.mlp.c_proj", config.bias)
    return g.op("Add", [x, h], f"/{p}/resid_mlp")


def _io(
    config: GPTConfig, kv_dtype: int = TensorProto.FLOAT
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs and outputs with their symbolic dimensions (see mlxgpt_export.signature).

    ``past``/``present`` have the graph's precision (``kv_dtype``); logits are float32.
    """

    def tensor(name: str, dtype: int, shape: list[str | int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, shape)

    kv_past = [sig.BATCH, config.n_head, sig.PAST_SEQUENCE, config.head_size]
    kv_present = [sig.BATCH, config.n_head, sig.TOTAL_SEQUENCE, config.head_size]
    inputs = [
        tensor(sig.INPUT_IDS, TensorProto.INT64, [sig.BATCH, sig.SEQUENCE]),
        tensor(sig.ATTENTION_MASK, TensorProto.INT64, [sig.BATCH, sig.TOTAL_SEQUENCE]),
        tensor(sig.POSITION_IDS, TensorProto.INT64, [sig.BATCH, sig.SEQUENCE]),
    ]
    outputs = [tensor(sig.LOGITS, TensorProto.FLOAT, [sig.BATCH, sig.SEQUENCE, config.vocab_size])]
    for i in range(config.n_layer):
        inputs += [tensor(name, kv_dtype, kv_past) for name in sig.past_names(i)]
        outputs += [tensor(name, kv_dtype, kv_present) for name in sig.present_names(i)]
    return inputs, outputs


def _head(g: _Graph, x: str, separate: bool) -> str:
    """The tied LM head ``x @ wte^T``; logits cast to float32 in a float16 graph."""
    if separate:  # its own (in, out) initializer: a MatMul weight int8 quantization can reach
        wte_t = g.weight("wte.weight", transpose=True, stored=HEAD_WEIGHT)
    else:  # the same wte initializer as the input Gather
        wte_t = g.op("Transpose", [g.weight("wte.weight")], "/lm_head/wte_t", perm=[1, 0])
    if not g.half:
        return g.op("MatMul", [x, wte_t], sig.LOGITS)
    logits = g.op("MatMul", [x, wte_t], "/lm_head/logits_f16")
    return g.op("Cast", [logits], sig.LOGITS, to=TensorProto.FLOAT)


def _add_initializers(graph: onnx.GraphProto, initializers: dict) -> None:
    """Serialize each initializer into ``graph``, converted one tensor at a time.

    Appended to the finished model's own graph: passing the tensors to ``make_graph`` and
    the graph to ``make_model`` instead copies them twice, and protobuf (upb) keeps all
    three copies alive as long as the model (measured: 3x the weights' size).
    """
    for name, (array, dtype) in initializers.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))


def build_model(
    config: GPTConfig,
    weights: dict[str, np.ndarray],
    attention: str = "portable",
    dtype: str = "float32",
    separate_head: bool = False,
) -> onnx.ModelProto:
    """The ONNX model for ``config`` and float32 ``weights`` (names of mlxgpt.checkpoint).

    ``dtype``: the graph's precision (module docstring); ``separate_head``: store the head's
    matrix as its own initializer instead of reusing ``wte`` through a Transpose.
    """
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention must be one of {ATTENTION_FORMS}, got {attention!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    g = _Graph(weights, dtype)
    tokens = g.op("Gather", [g.weight("wte.weight"), sig.INPUT_IDS], "/embed/tokens")
    positions = g.op("Gather", [g.weight("wpe.weight"), sig.POSITION_IDS], "/embed/positions")
    x = g.op("Add", [tokens, positions], "/embed/out")
    bias = attention_bias(g, np.float16 if g.half and attention == "fused" else np.float32)
    for i in range(config.n_layer):
        x = _block(g, x, i, config, bias, attention)
    _head(g, _layer_norm(g, x, "ln_f", config.bias), separate_head)

    inputs, outputs = _io(config, g.onnx_dtype)
    graph = helper.make_graph(
        g.nodes,
        "mlxgpt",
        inputs,
        outputs,
        doc_string=f"mlxgpt GPT decoder, {attention} attention, {dtype}, KV cache in/out",
    )
    opset = OPSETS[attention]
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSIONS[opset],
        producer_name="mlxgpt",
    )
    _add_initializers(model.graph, g.initializers)
    return model
