"""The sampling rules and the generation loop, shared by every backend (numpy only).

MLX generation (:mod:`mlxgpt.generate`) and the onnxruntime runtime (:mod:`mlxgpt_export.runtime`)
both hand their last-position logits to :func:`sample_next` and drive the same
:func:`generate_ids` loop, so for the same logits, settings and seed they pick the same
tokens. This module never imports MLX.

Sampling semantics, applied in this order to the logits of the next token:

1. ``temperature`` 0, or any temperature below :data:`MIN_TEMPERATURE` (1e-5): greedy —
   the arg-max token (the lowest id among exact ties); nothing random is drawn. Dividing
   by a tinier temperature overflows (1e-320 turns every logit into inf, then NaN), and
   at 1e-5 the softmax is already one-hot unless two logits lie within 0.01 of each other.
2. Divide the logits by ``temperature`` (>= 1e-5).
3. ``top_k`` (``None`` or 0 = off): keep exactly the ``k`` largest logits; ties at the
   boundary are broken in favour of the lower token id.
4. Softmax over what is left (in float64).
5. ``top_p`` (``1.0`` = off): sort the remaining tokens by probability (descending, ties by
   lower id) and keep the shortest prefix whose cumulative probability reaches ``top_p``;
   the most likely token is always kept. "Reaches" allows a 1e-9 rounding slack, so
   ``top_p=0.5`` on probabilities ``[0.5, 0.3, 0.2]`` keeps one token, not two.
6. Renormalise and draw one token by inverse CDF from a single ``rng.random()`` value.

The random stream is ``numpy.random.default_rng(seed)``: one uniform number per sampled
token, so the same seed gives the same text on every backend. A seed is a whole number
from 0 to :data:`MAX_SEED` (2**32 - 1) wherever one enters mlxgpt (sampling, training,
both command lines): training derives MLX's per-step seeds from it, which must fit 64 bits.

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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mlxgpt.errors import UserError

DEFAULT_MAX_TOKENS = 200  # new tokens per generation when the caller does not say
MIN_TEMPERATURE = 1e-5  # temperatures below this (and 0) mean greedy: rule 1 above
MAX_SEED = 2**32 - 1  # seeds are 0..MAX_SEED everywhere (see the module docstring)


class SamplingError(UserError, ValueError):
    """A sampling setting out of range; the message says which values are allowed."""


def is_whole(value: Any) -> bool:
    """True for Python and numpy integers (not bools, not floats such as 2.0 or 2.5)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_seed(seed: Any, name: str = "seed", error: type[UserError] = SamplingError) -> None:
    """Raise ``error`` unless ``seed`` is a whole number from 0 to :data:`MAX_SEED`."""
    if not is_whole(seed) or not 0 <= seed <= MAX_SEED:
        raise error(f"{name} must be a whole number from 0 to {MAX_SEED} (2**32 - 1), got {seed!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; the field defaults are the library's defaults."""

    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or not 0 <= self.temperature < np.inf:
            raise SamplingError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if self.top_k is not None and (not is_whole(self.top_k) or self.top_k < 0):
            raise SamplingError(
                f"top_k must be a whole number >= 1 (0 or None: off), got {self.top_k!r}"
            )
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        """Arg-max decoding: temperature 0 or below :data:`MIN_TEMPERATURE` (rule 1)."""
        return self.temperature < MIN_TEMPERATURE

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def to_generation_config(params: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """Hugging Face ``generation_config.json`` keys that mean exactly ``params``.

    Greedy settings are ``do_sample: false`` alone (transformers warns about sampling
    keys it would ignore). Sampling settings always carry ``top_k`` (0 = off), because
    transformers applies ``top_k=50`` when the key is missing.
    """
    values: dict[str, Any] = {"do_sample": not params.greedy, "max_new_tokens": max_tokens}
    if not params.greedy:
        values.update(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p)
    return values


def from_generation_config(values: Mapping[str, Any]) -> tuple[SamplingParams, int]:
    """The sampling settings and token budget a ``generation_config.json`` asks for.

    Read with Hugging Face's meaning and its defaults for missing keys: greedy unless
    ``do_sample`` is true; then ``temperature`` (default 1.0), ``top_k`` (default 50,
    0 = off) and ``top_p`` (default 1.0). ``max_new_tokens`` defaults to
    :data:`DEFAULT_MAX_TOKENS`. Raises :class:`SamplingError` for values of the wrong type
    or range.
    """
    try:
        max_tokens = values.get("max_new_tokens") or DEFAULT_MAX_TOKENS
        check_max_tokens(max_tokens)
        if not values.get("do_sample", False):
            return SamplingParams(temperature=0.0), max_tokens
        top_k = values.get("top_k", 50)
        params = SamplingParams(
            temperature=float(values.get("temperature", 1.0)),
            top_k=int(top_k) if top_k else None,
            top_p=float(values.get("top_p", 1.0)),
        )
    except (TypeError, ValueError) as err:
        raise SamplingError(f"invalid sampling settings {dict(values)}: {err}") from None
    return params, max_tokens


def with_overrides(
    base: SamplingParams,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> SamplingParams:
    """``base`` (e.g. an export folder's ``generation_config.json``) with the settings a
    caller gave: ``None`` keeps ``base``'s, ``top_k=0`` turns top-k off; the seed is always
    the caller's. The one rule for command-line flags and the server's request fields."""
    changes: dict[str, Any] = {"seed": seed}
    if temperature is not None:
        changes["temperature"] = temperature
    if top_p is not None:
        changes["top_p"] = top_p
    if top_k is not None:
        changes["top_k"] = top_k or None
    return replace(base, **changes)


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a token is drawn from, after temperature, top-k and top-p."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    _check_finite(z)
    if params.greedy:
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


def _check_finite(logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf: the model produced invalid output")


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token id from one row of logits (see the module docstring)."""
    if params.greedy:  # rule 1 is one arg-max, in the logits' own dtype (exact, and cheap)
        z = np.asarray(logits).reshape(-1)
        _check_finite(z)
        return int(np.argmax(z))
    probs = filtered_probs(logits, params)
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), probs.size - 1))


def sample_rows(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
) -> list[int]:
    """Row ``r``'s next token for every row of ``logits`` ``(rows, vocab)``: exactly
    ``sample_next(logits[r], params[r], rngs[r])``, with the common cases batched.

    A batch decoder samples every row each step, and per-row numpy calls cost more than
    the graph of a small model. Greedy rows are one arg-max together; rows with only a
    temperature (no top-k, no top-p) run rules 2, 4 and 6 as whole-batch array operations
    that do, per element and per row, the same float64 arithmetic as :func:`sample_next`
    (element-wise division and ``exp``, a row maximum, row sums and cumulative sums over
    the same contiguous rows in the same order), so the tokens are identical -- tested
    against ``sample_next`` on generated logits. Each row still draws its one
    ``rng.random()`` from its own stream. Other rows, and logits with NaN or inf (which
    raise there), go through :func:`sample_next`.
    """
    z = np.asarray(logits)
    tokens: list[int | None] = [None] * len(params)
    greedy = [r for r, p in enumerate(params) if p.greedy]
    plain = [r for r, p in enumerate(params) if not p.greedy and _temperature_only(p, z.shape[-1])]
    if not np.isfinite(z).all():
        greedy, plain = [], []
    if greedy:
        for r, token in zip(greedy, np.argmax(z[greedy], axis=-1).tolist(), strict=True):
            tokens[r] = token
    if plain:
        temperatures = np.array([params[r].temperature for r in plain], dtype=np.float64)
        scaled = z[plain].astype(np.float64) / temperatures[:, None]
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        cdf = np.cumsum(probs, axis=1)
        u = np.array([rngs[r].random() for r in plain]) * cdf[:, -1]
        drawn = np.minimum((cdf <= u[:, None]).sum(axis=1), z.shape[-1] - 1)
        for r, token in zip(plain, drawn.tolist(), strict=True):
            tokens[r] = token
    return [
        sample_next(z[r], params[r], rngs[r]) if token is None else token
        for r, token in enumerate(tokens)
    ]


def _temperature_only(params: SamplingParams, vocab: int) -> bool:
    return (not params.top_k or params.top_k >= vocab) and params.top_p >= 1.0


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


def check_max_tokens(max_tokens: Any, error: type[UserError] = SamplingError) -> None:
    """Raise ``error`` unless ``max_tokens`` is a whole number >= 0."""
    if not is_whole(max_tokens) or max_tokens < 0:
        raise error(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")


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
    it is not yielded. Bad arguments raise :class:`SamplingError` at the call, before
    anything is generated.
    """
    check_max_tokens(max_tokens)
    context = crop_prompt(prompt_ids, block_size)
    if not context:
        raise SamplingError("generation needs at least one prompt token")
    rng = rng if rng is not None else params.rng()
    return _generate(step, context, max_tokens, block_size, params, rng, stop_id)


def _generate(
    step: StepFn,
    context: list[int],
    max_tokens: int,
    block_size: int,
    params: SamplingParams,
    rng: np.random.Generator,
    stop_id: int | None,
) -> Iterator[int]:
    """The loop of :func:`generate_ids`, for arguments it has checked."""
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
