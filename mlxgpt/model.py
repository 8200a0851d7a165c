"""A GPT-2 style decoder-only transformer in MLX.

Parameter names follow the GPT-2 checkpoint layout (``wte``, ``wpe``, ``h.N.ln_1``,
``h.N.attn.c_attn``, ``h.N.attn.c_proj``, ``h.N.mlp.c_fc``, ``h.N.mlp.c_proj``, ``ln_f``)
so weights map one-to-one onto GPT-2 and onto the ONNX exporter. The LM head is tied to
``wte``. No loss or training logic lives here.

The causal mask
---------------
Training predicts every position in one parallel pass, which is only honest if position
``i`` cannot look at positions ``> i``. :func:`causal_mask` is the one place this rule is
written down for MLX: an additive ``(q_len, kv_len)`` matrix, ``0`` where a query may see
a key and the most negative finite float where the key lies in the query's future, so
that ``softmax`` gives those keys exactly zero weight. Queries are the *last* ``q_len`` of
the ``kv_len`` positions (bottom-right aligned), which is what decoding with a KV cache
needs. The fused path (``mask="causal"``) asks ``mx.fast.scaled_dot_product_attention``
for the same rule (its ``"causal"`` mask is documented as lower-right aligned); the
explicit path (``mask="explicit"``) builds the matrix; tests check both agree.

On the CPU
----------
MLX's CPU kernels for ``exp``/``erf``/``tanh`` run one element at a time, so on the CPU
the model computes the same functions with :mod:`mlxgpt.kernels` (forms that MLX's
compiler turns into vectorised loops): the GELU, LayerNorm (float32), and for
``mask="causal"`` (and ``"none"``) the attention as ``softmax(q k^T * scale +
causal_mask) v`` with that module's softmax; each only for arrays of 8192 elements or
more (:func:`mlxgpt.kernels.use_cpu_forms`: decoding single tokens is faster with MLX's
own kernels). ``mask="explicit"`` always takes MLX's own
softmax, the straightforward reference the tests compare the other paths with.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxgpt import kernels
from mlxgpt.config import LAYER_NORM_EPS, GPTConfig

MaskSpec = str | mx.array | None  # "causal" | "explicit" | "none" | additive array


def causal_mask(q_len: int, kv_len: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive causal mask of shape ``(q_len, kv_len)``, bottom-right aligned.

    Entry ``[i, j]`` is 0 when key ``j`` is at or before query ``i``'s position
    (``kv_len - q_len + i``) and ``finfo(dtype).min`` otherwise. The most negative
    *finite* value is used instead of ``-inf`` so a row can never become NaN.
    """
    offset = kv_len - q_len
    query_pos = mx.arange(offset, kv_len)[:, None]
    key_pos = mx.arange(kv_len)[None, :]
    return mx.where(key_pos <= query_pos, 0.0, mx.finfo(dtype).min).astype(dtype)


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        return self.keys, self.values


def make_cache(model: GPT) -> list[KVCache]:
    return [KVCache() for _ in model.h]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Project to queries, keys and values shaped ``(B, n_head, T, head_size)``."""
        B, T, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        heads = [
            t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3) for t in (q, k, v)
        ]
        return heads[0], heads[1], heads[2]

    def __call__(self, x: mx.array, mask: MaskSpec = "causal", cache: KVCache | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        scale = 1.0 / math.sqrt(C // self.n_head)
        if isinstance(mask, str) and mask == "explicit":
            mask = causal_mask(q.shape[2], k.shape[2])
        scores_size = B * self.n_head * T * k.shape[2]
        if (mask is None or isinstance(mask, str)) and kernels.use_cpu_forms(scores_size):
            y = _attention_cpu(q, k, v, mask, scale)
        elif mask is None or isinstance(mask, str):  # None or "causal": the fused kernel
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        else:
            y = attention_weights(q, k, mask, scale).astype(v.dtype) @ v
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def attention_weights(q: mx.array, k: mx.array, mask: mx.array, scale: float) -> mx.array:
    """Explicit attention probabilities: ``softmax(q k^T * scale + mask)`` in float32."""
    scores = (q * scale).astype(mx.float32) @ k.astype(mx.float32).transpose(0, 1, 3, 2)
    return mx.softmax(scores + mask.astype(mx.float32), axis=-1)


def _attention_cpu(q: mx.array, k: mx.array, v: mx.array, mask: str | None, scale: float):
    """``softmax(q k^T * scale + causal_mask) v`` (no mask for ``None``), float32 softmax.

    The fused kernel's computation written out, with :func:`mlxgpt.kernels.softmax`.
    """
    scores = (q * scale).astype(mx.float32) @ k.astype(mx.float32).transpose(0, 1, 3, 2)
    if mask is not None:
        scores = scores + causal_mask(q.shape[2], k.shape[2])
    return kernels.softmax(scores).astype(v.dtype) @ v


# GPTConfig.activation -> (MLX's function, the same function in vectorisable form)
ACTIVATIONS = {
    "gelu": (nn.gelu, kernels.gelu),
    "gelu_tanh": (nn.gelu_approx, kernels.gelu_tanh),
}


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_name = config.activation

    def activation(self, x: mx.array) -> mx.array:
        """The configured GELU: MLX's function, or on the CPU the same in vectorisable form."""
        simple, cpu_form = ACTIVATIONS[self.activation_name]
        return cpu_form(x) if kernels.use_cpu_forms(x.size) else simple(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters); on the CPU, in float32, :func:`kernels.layer_norm`."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32 and kernels.use_cpu_forms(x.size):
            return kernels.layer_norm(x, self.get("weight"), self.get("bias"), self.eps)
        return super().__call__(x)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, mask: MaskSpec = "causal", cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LayerNorm blocks, tied LM head.

    ``mask``: ``"causal"`` (fused kernel, the default), ``"explicit"`` (the additive
    matrix of :func:`causal_mask`; same outputs), ``"none"`` (no mask at all: the
    "cheating" teaching device) or an additive array broadcastable to
    ``(B, n_head, T, T_past + T)``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = [Block(config) for _ in range(config.n_layer)]
        self.ln_f = LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layer)

        def init(path: str, p: mx.array) -> mx.array:
            if path.endswith("bias"):
                return mx.zeros_like(p)
            if path.startswith("ln") or ".ln_" in path:
                return mx.ones_like(p)
            s = resid_std if path.endswith("c_proj.weight") else std
            return mx.random.normal(p.shape, dtype=p.dtype) * s

        params = tree_flatten(self.parameters())
        self.update(tree_unflatten([(k, init(k, v)) for k, v in params]))

    def __call__(
        self, idx: mx.array, mask: MaskSpec = "causal", cache: list[KVCache] | None = None
    ) -> mx.array:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` of shape ``(B, T)``."""
        offset = cache[0].offset if cache else 0
        T = idx.shape[1]
        if offset + T > self.config.block_size:
            raise ValueError(
                f"sequence of {offset + T} tokens exceeds the context window "
                f"(block_size={self.config.block_size})"
            )
        if isinstance(mask, str) and mask == "none":
            mask = None
        pos = mx.arange(offset, offset + T)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.h):
            x = block(x, mask, cache[i] if cache else None)
        x = self.ln_f(x)
        return self.wte.as_linear(x)

    def attention_maps(self, idx: mx.array) -> list[mx.array]:
        """Attention probabilities of every layer, each ``(B, n_head, T, T)``, for pictures."""
        T = idx.shape[1]
        mask = causal_mask(T, T)
        x = self.wte(idx) + self.wpe(mx.arange(T))
        maps = []
        for block in self.h:
            q, k, _ = block.attn.qkv(block.ln_1(x))
            maps.append(attention_weights(q, k, mask, 1.0 / math.sqrt(q.shape[-1])))
            x = block(x, mask)
        return maps

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(v.size for _, v in tree_flatten(self.parameters()))
        return n - self.wpe.weight.size if non_embedding else n

    def state_dict(self) -> dict[str, Any]:
        return dict(tree_flatten(self.parameters()))
