"""Autoregressive generation with MLX and a KV cache.

The sampling rules and the loop are :mod:`mlxgpt.sampling`'s, shared with the onnxruntime
runtime; this module only supplies the MLX forward step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlxgpt import sampling
from mlxgpt.model import GPT, make_cache
from mlxgpt.sampling import SamplingParams, StepFn, generate_ids
from mlxgpt.tokenizer import Tokenizer, prompt_ids, stream_text

__all__ = ["cached_step", "generate_text", "generate_tokens", "prompt_ids", "recompute_step"]


def _last_logits(logits: mx.array) -> np.ndarray:
    """The first row's last-position logits as float32 numpy, for the shared sampler."""
    return np.array(logits[0, -1].astype(mx.float32))


def cached_step(model: GPT) -> StepFn:
    """A step function that keeps a KV cache between calls (reset when ``past_len == 0``)."""
    cache = make_cache(model)

    def step(new_ids: Sequence[int], past_len: int) -> np.ndarray:
        nonlocal cache
        if past_len == 0:
            cache = make_cache(model)
        assert cache[0].offset == past_len, "cache out of sync with the generation loop"
        return _last_logits(model(mx.array([list(new_ids)], dtype=mx.int32), cache=cache))

    return step


def recompute_step(model: GPT) -> StepFn:
    """A step function without a cache: every call runs the whole sequence again."""
    return sampling.recompute_step(lambda ids: _last_logits(model(mx.array([ids], dtype=mx.int32))))


def generate_tokens(
    model: GPT,
    ids: Sequence[int],
    max_tokens: int,
    params: SamplingParams,
    use_cache: bool = True,
    stop_id: int | None = None,
) -> Iterator[int]:
    """New token ids after ``ids``; drawing ``stop_id`` (end of text) ends generation."""
    step = cached_step(model) if use_cache else recompute_step(model)
    block = model.config.block_size
    return generate_ids(step, ids, max_tokens, block, params, stop_id=stop_id)


def generate_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int, params: SamplingParams
) -> Iterator[str]:
    """Stream the generated text piece by piece (the prompt itself is not repeated)."""
    ids = prompt_ids(tokenizer, prompt)
    tokens = generate_tokens(model, ids, max_tokens, params, stop_id=tokenizer.eos_id)
    return stream_text(tokenizer, tokens)
