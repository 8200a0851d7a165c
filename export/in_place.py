"""The in-place KV cache: an export's graph rewritten so decoding never copies the cache.

An exported graph (:mod:`mlxgpt_export.graph`) takes the cache as ``past_key_values.*`` and
returns ``present.* = Concat(past, new)``: the signature every client drives (Optimum,
transformers.js, onnxruntime-genai). That Concat copies every layer's whole cache on every
decode step, so a step's cost grows with the context even at batch 1 (measured on the
shakespeare-char shape, int8 export, batch 1, 128 + 256 tokens: 22% of the step's kernel
time). onnxruntime-genai runs such a graph the same way on CPUs (it shares past and present
buffers only on CUDA).

:func:`in_place_model` derives, from the same file, a graph for onnxruntime alone in which
each layer's attention -- everything between the ``Split`` outputs ``/h.{i}/attn/{q,k,v}``
and ``/h.{i}/attn/y``, plus the Concat of the cache, in either attention form -- is one
``com.microsoft`` ``GroupQueryAttention`` node (``kv_num_heads = num_heads``: plain
multi-head attention). Its past and present are buffers of a fixed length that the caller
binds to the *same* memory (IO binding); the operator writes the new keys and values into
them at each row's length and attends over that row's first ``seqlens_k + 1`` positions
only, causally; it takes the packed q/k/v projection (the ``Split`` goes). Each GELU chain
of :func:`mlxgpt_export.graph._gelu` becomes one ``com.microsoft`` ``Gelu`` (erf) or
``FastGelu`` (tanh) node: fewer nodes per step for onnxruntime to run. A float16 graph is
widened to compute in float32 (:func:`_widen_float16`), as onnxruntime's CPU kernels mostly
do anyway. Everything else -- embeddings, LayerNorms, MatMuls (int8 ones included), the LM
head -- is the exported graph's own nodes, untouched, so the rewrite changes how attention
and GELU are computed, and in what precision, and nothing else (tests/test_in_place.py
holds its logits to the exported graph's, tests/test_export_precision.py to the float64
reference in every precision and attention form).

The rewritten graph's inputs: ``input_ids`` and ``position_ids`` as exported; the caches
``(batch, n_head, cache_length, head_size)``; ``seqlens_k`` int32 ``(batch,)``, each row's
length after this call minus 1; ``total_sequence_length`` int32 scalar, the longest of those
lengths. There is no ``attention_mask``: a row's tokens are its first ``seqlens_k + 1``
cache positions (padding goes on the right, and only ever sits beyond a row's length).
The mask subgraph of the export has no consumer left and is removed.

Needs the ``onnx`` package (the runtime without it decodes with the exported graph, see
:func:`write_in_place_model`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxgpt.config import GPTConfig
from mlxgpt_export import signature as sig

SEQLENS_K = "seqlens_k"
TOTAL_LENGTH = "total_sequence_length"
CACHE_LENGTH = "cache_length"  # the symbolic dimension of the fixed-length caches
CONTRIB_DOMAIN = "com.microsoft"


class RewriteError(Exception):
    """The graph is not one :func:`in_place_model` knows how to rewrite."""


def producers(graph: Any) -> dict[str, int]:
    """Tensor name -> index of the node that makes it."""
    return {out: index for index, node in enumerate(graph.node) for out in node.output}


def attention_nodes(graph: Any, layer: int, producer: dict[str, int]) -> set[int]:
    """Indices of layer ``layer``'s attention nodes: every node of the layer's scope
    (``/h.{i}/attn/``) or making one of its ``present.*`` on a path back from ``y`` or a
    present, up to q, k, v and the pasts.

    The nodes shared by all layers (the mask subgraph) are not among them: they lose their
    consumers and are pruned with the rest of the dead nodes.
    """
    scope = f"/h.{layer}/attn/"
    starts = {f"{scope}{name}" for name in "qkv"} | set(sig.past_names(layer))
    own = set(sig.present_names(layer))
    for name in (*(f"{scope}{n}" for n in "qkvy"), *own):
        if name not in producer:
            raise RewriteError(f"the graph has no tensor {name!r}")
    found: set[int] = set()
    stack = [f"{scope}y", *own]
    while stack:
        name = stack.pop()
        index = producer.get(name)
        if index is None or index in found or name in starts:
            continue
        if name.startswith(scope) or name in own:
            found.add(index)
            stack.extend(graph.node[index].input)
    return found


GELU_OPS = {"gelu": "Gelu", "gelu_tanh": "FastGelu"}  # com.microsoft


def gelu_nodes(graph: Any, layer: int, producer: dict[str, int]) -> tuple[set[int], str] | None:
    """Indices of layer ``layer``'s GELU nodes (:func:`mlxgpt_export.graph._gelu`: the nodes
    under ``/h.{i}/mlp/gelu/`` that ``.../out`` is computed from; an int8 graph's quantizer
    adds nodes of that scope after it, which stay) and the one tensor they take; ``None``
    where the graph has no such chain."""
    scope = f"/h.{layer}/mlp/gelu/"
    constants = {t.name for t in graph.initializer}
    found: set[int] = set()
    stack = [f"{scope}out"]  # back from the output, through the scope only
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in found:
            found.add(index)
            stack.extend(n for n in graph.node[index].input if n.startswith(scope))
    outputs = {o for i in found for o in graph.node[i].output}
    inputs = {
        name
        for i in found
        for name in graph.node[i].input
        if name not in outputs and name not in constants
    }
    consumers = {n for i, node in enumerate(graph.node) if i not in found for n in node.input}
    if f"{scope}out" not in outputs or len(inputs) != 1 or (outputs - {f"{scope}out"}) & consumers:
        return None  # not the chain _gelu writes, or a node outside it reads a partial result
    return found, inputs.pop()


def _live_nodes(graph: Any, nodes: list) -> list:
    """``nodes`` minus those no graph output depends on (order kept)."""
    needed = {output.name for output in graph.output}
    live = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def _packed_qkv(graph: Any, layer: int, producer: dict[str, int]) -> list[str]:
    """The attention's query/key/value inputs: the one projection ``c_attn`` makes, where
    q, k and v are the three outputs of one ``Split`` of it (the operator splits it itself,
    one node less a layer), else q, k, v."""
    scope = f"/h.{layer}/attn"
    qkv = [f"{scope}/{n}" for n in "qkv"]
    split = graph.node[producer[qkv[0]]] if qkv[0] in producer else None
    if split is not None and split.op_type == "Split" and list(split.output) == qkv:
        return [split.input[0], "", ""]
    return qkv


def _group_query_attention(layer: int, config: GPTConfig, helper: Any, qkv: list[str]) -> Any:
    """Layer ``layer``'s attention as one node, reading and writing the cache in place."""
    scope = f"/h.{layer}/attn"
    return helper.make_node(
        "GroupQueryAttention",
        [*qkv, *sig.past_names(layer), SEQLENS_K, TOTAL_LENGTH],
        [f"{scope}/y", *sig.present_names(layer)],
        name=f"{scope}/group_query_attention",
        domain=CONTRIB_DOMAIN,
        num_heads=config.n_head,
        kv_num_heads=config.n_head,
        scale=1 / math.sqrt(config.head_size),
    )


def _widen_float16(graph: Any) -> None:
    """Make a float16 graph compute in float32 (in place): every float16 initializer,
    constant, cast and graph value becomes float32. onnxruntime's CPU kernels mostly lack
    float16 and run such a graph in float32 already, casting around each node; widened, it
    drops those casts and runs attention and its cache in float32 too. The weights are the
    export's own float16 values, exactly (float32 holds every float16)."""
    import numpy as np
    from onnx import AttributeProto, TensorProto, numpy_helper

    def widen(tensor: Any) -> None:
        if tensor.data_type == TensorProto.FLOAT16:
            wide = numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float32), tensor.name
            )
            tensor.CopyFrom(wide)

    for tensor in graph.initializer:
        widen(tensor)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                widen(attribute.t)
            elif node.op_type == "Cast" and attribute.name == "to":
                if attribute.i == TensorProto.FLOAT16:
                    attribute.i = TensorProto.FLOAT
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT


def in_place_model(model: Any, config: GPTConfig) -> Any:
    """Rewrite an exported ``onnx.ModelProto`` (in place, and return it): see the module
    docstring. Raises :class:`RewriteError` when the graph is not an mlxgpt export of
    ``config``'s shape (a legacy or foreign file), so the caller keeps the exported graph.
    """
    from onnx import TensorProto, helper

    if config.head_size % 8:  # onnxruntime's GroupQueryAttention refuses such heads
        raise RewriteError(f"head size {config.head_size} is not a multiple of 8")
    graph = model.graph
    expected = set(sig.input_names(config.n_layer))
    if {i.name for i in graph.input} != expected:
        raise RewriteError("the graph's inputs are not those of an mlxgpt export")
    producer = producers(graph)
    groups = []  # (indices of the nodes replaced, the node replacing them)
    for layer in range(config.n_layer):
        qkv = _packed_qkv(graph, layer, producer)
        attention = _group_query_attention(layer, config, helper, qkv)
        groups.append((attention_nodes(graph, layer, producer), attention))
    for layer in range(config.n_layer):
        gelu = gelu_nodes(graph, layer, producer)
        if gelu is not None:
            scope, op = f"/h.{layer}/mlp/gelu/", GELU_OPS[config.activation]
            node = helper.make_node(
                op, [gelu[1]], [f"{scope}out"], name=f"{scope}{op}", domain=CONTRIB_DOMAIN
            )
            groups.append((gelu[0], node))
    first = {min(indices): node for indices, node in groups}
    replaced = {index for indices, _ in groups for index in indices}
    nodes = []
    for index, node in enumerate(graph.node):  # each new node where its group began
        if index in first:
            nodes.append(first[index])
        elif index not in replaced:
            nodes.append(node)
    live = _live_nodes(graph, nodes)
    del graph.node[:]
    graph.node.extend(live)
    inputs = [i for i in graph.input if i.name != sig.ATTENTION_MASK]
    inputs += [
        helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [sig.BATCH]),
        helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, []),
    ]
    del graph.input[:]
    graph.input.extend(inputs)
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].dim_param = CACHE_LENGTH
    used = {name for node in live for name in (*node.input, *node.output)}
    for field in (graph.initializer, graph.value_info):  # drop what only the old nodes used
        for index in reversed(range(len(field))):  # in place: extend() would copy each tensor
            if field[index].name not in used:
                del field[index]
    _widen_float16(graph)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return model


def write_in_place_model(model_path: Path, config: GPTConfig, out: Path) -> bool:
    """Write the in-place graph of the model file to ``out``; ``False`` (nothing written)
    where it cannot be made: ``onnx`` is not installed (the minimal runtime install), the file
    is not an mlxgpt export (:class:`RewriteError`), or it keeps its weights in external data
    (over 2 GiB: such models decode with the exported graph).

    A file, not bytes, for onnxruntime to load: a session made from serialized bytes keeps
    more memory than one made from a path (measured on the shakespeare-char shape's 43 MB of
    weights: 113 MB against 82 MB), and the model in memory is dropped before it starts.
    """
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:
        return False
    model = onnx.load(str(model_path), load_external_data=False)
    if any(uses_external_data(t) for t in model.graph.initializer):
        return False
    try:
        in_place_model(model, config)
    except RewriteError:
        return False
    onnx.save(model, str(out))
    return True
