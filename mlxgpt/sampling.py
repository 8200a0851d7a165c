"""The sampling rules and the generation loop, shared by every backend (numpy only).

MLX generation (:mod:`mlxgpt.generate`) and the onnxruntime runtime (:mod:`mlxgpt_export.runtime`)
both hand their last-position logits to :func:`sample_next` and drive the same
:func:`generate_ids` loop, so for the same logits, settings and seed they pick the same
tokens. This module never imports MLX.

Sampling semantics, applied in this order to the logits of the next token:

1. ``temperature == 0``: greedy — the arg-max token (the lowest id among exact ties).
   Nothing random is drawn.
2. Divide the logits by ``temperature`` (> 0).
3. ``top_k`` (``None`` or 0 = off): keep exactly the ``k`` largest logits; ties at the
   boundary are broken in favour of the lower token id.
4. Softmax over what is left (in float64).
5. ``top_p`` (``1.0`` = off): sort the remaining tokens by probability (descending, ties by
   lower id) and keep the shortest prefix whose cumulative probability reaches ``top_p``;
   the most likely token is always kept. "Reaches" allows a 1e-9 rounding slack, so
   ``top_p=0.5`` on probabilities ``[0.5, 0.3, 0.2]`` keeps one token, not two.
6. Renormalise and draw one token by inverse CDF from a single ``rng.random()`` value.

The random stream is ``numpy.random.default_rng(seed)``: one uniform number per sampled
token, so the same seed gives the same text on every backend.

Defaults live here and nowhere else: :class:`SamplingParams`'s field defaults (greedy,
no top-k, no top-p: what Hugging Face ``generate()`` does for a folder that says nothing)
and :data:`DEFAULT_MAX_TOKENS`. Both command lines and the exported
``generation_config.json`` are derived from them (:func:`to_generation_config`), and an
export folder's ``generation_config.json`` is read back with Hugging Face's meaning
(:func:`from_generation_config`), so a setting means the same in mlxgpt, transformers,
Optimum and transformers.js.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_MAX_TOKENS = 200  # new tokens per generation when the caller does not say


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; the field defaults are the library's defaults."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 1 (or 0/None to disable), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def to_generation_config(params: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """Hugging Face ``generation_config.json`` keys that mean exactly ``params``.

    Greedy settings are ``do_sample: false`` alone (transformers warns about sampling
    keys it would ignore). Sampling settings always carry ``top_k`` (0 = off), because
    transformers applies ``top_k=50`` when the key is missing.
    """
    values: dict[str, Any] = {"do_sample": params.temperature > 0, "max_new_tokens": max_tokens}
    if params.temperature > 0:
        values.update(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p)
    return values


def from_generation_config(values: Mapping[str, Any]) -> tuple[SamplingParams, int]:
    """The sampling settings and token budget a ``generation_config.json`` asks for.

    Read with Hugging Face's meaning and its defaults for missing keys: greedy unless
    ``do_sample`` is true; then ``temperature`` (default 1.0), ``top_k`` (default 50,
    0 = off) and ``top_p`` (default 1.0). ``max_new_tokens`` defaults to
    :data:`DEFAULT_MAX_TOKENS`. Raises ``ValueError`` for values of the wrong type or range.
    """
    try:
        max_tokens = int(values.get("max_new_tokens") or DEFAULT_MAX_TOKENS)
        if not values.get("do_sample", False):
            return SamplingParams(temperature=0.0), max_tokens
        top_k = values.get("top_k", 50)
        params = SamplingParams(
            temperature=float(values.get("temperature", 1.0)),
            top_k=int(top_k) if top_k else None,
            top_p=float(values.get("top_p", 1.0)),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid sampling settings {dict(values)}: {err}") from None
    return params, max_tokens


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a token is drawn from, after temperature, top-k and top-p."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or inf: the model produced invalid output")
    if params.temperature == 0:
        probs = np.zeros_like(z)
        probs[int(np.argmax(z))] = 1.0
        return probs
    z = z / params.temperature
    keep = np.ones(z.shape, dtype=bool)
    if params.top_k and params.top_k < z.size:
        order = np.argsort(-z, kind="stable")
        keep[:] = False
        keep[order[: params.top_k]] = True
    z = np.where(keep, z, -np.inf)
    probs = np.exp(z - z[keep].max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep a token if the mass before it has not yet reached top_p
        before = cumulative - probs[order]
        n_keep = max(1, int(np.searchsorted(before, params.top_p - 1e-9, "left")))
        nucleus = np.zeros_like(probs)
        nucleus[order[:n_keep]] = probs[order[:n_keep]]
        probs = nucleus / nucleus.sum()
    return probs


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token id from one row of logits (see the module docstring)."""
    probs = filtered_probs(logits, params)
    if params.temperature == 0:
        return int(np.argmax(probs))
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), probs.size - 1))


# step(new_ids, past_len) -> logits of the last new position. past_len == 0 means: forget
# any cached keys/values and start from new_ids alone.
StepFn = Callable[[Sequence[int], int], np.ndarray]


def recompute_step(last_logits: Callable[[list[int]], np.ndarray]) -> StepFn:
    """A step without a cache: each call runs ``last_logits`` on the whole sequence so far.

    The reference both backends' KV-cache paths are tested against; ``last_logits(ids)``
    returns the logits of the last position of ``ids``.
    """
    ids: list[int] = []

    def step(new_ids: Sequence[int], past_len: int) -> np.ndarray:
        nonlocal ids
        ids = ids[:past_len] + list(new_ids)
        return last_logits(ids)

    return step


def crop_prompt(prompt_ids: Sequence[int], block_size: int) -> list[int]:
    """Prompts longer than the context window keep their last ``block_size`` tokens."""
    return list(prompt_ids)[-block_size:]


def generate_ids(
    step: StepFn,
    prompt_ids: Sequence[int],
    max_tokens: int,
    block_size: int,
    params: SamplingParams,
    rng: np.random.Generator | None = None,
    stop_id: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_tokens`` new token ids, one at a time.

    The model sees at most ``block_size`` tokens. While the text fits, each step feeds
    only the newest token and reuses the KV cache; once it no longer fits, the window
    slides and the last ``block_size`` tokens are recomputed from scratch (there is no
    cache to reuse because every token's position changes). The prompt must be
    non-empty (callers substitute the tokenizer's start token for an empty prompt).
    Drawing ``stop_id`` (the tokenizer's end-of-text token, if it has one) ends the text:
    it is not yielded.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    context = crop_prompt(prompt_ids, block_size)
    if not context:
        raise ValueError("generation needs at least one prompt token")
    rng = rng if rng is not None else params.rng()
    if max_tokens == 0:
        return
    logits = step(context, 0)
    for i in range(max_tokens):
        token = sample_next(logits, params, rng)
        if token == stop_id:
            return
        yield token
        if i == max_tokens - 1:
            break
        context.append(token)
        if len(context) > block_size:
            context = context[-block_size:]
            logits = step(context, 0)
        else:
            logits = step([token], len(context) - 1)
