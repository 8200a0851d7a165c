"""Pictures of the causal mask and of a trained model's attention (``mlxgpt viz``).

Two views of one rule, "position i may only look at positions j <= i":

* :func:`mask_command` draws the N x N mask and walks through one query row with real
  numbers: raw attention scores (seeded random vectors, or scores the reader gives, e.g.
  a lesson's own), the scores after :func:`mlxgpt.model.causal_mask` is added, and the
  softmax probabilities the model's own :func:`attention_weights` computes.
* :func:`attention_command` draws what a trained model actually attends to, every layer
  and head, via :meth:`GPT.attention_maps`; every row is zero above the diagonal.

The ``draw_*`` functions return matplotlib figures without saving them, and the
``*_command`` functions return the arrays they drew, so tests can check both. Figures are
plain :class:`matplotlib.figure.Figure` objects on an Agg canvas: this library never
imports pyplot nor changes matplotlib's global backend (a caller's GUI keeps working).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from mlxgpt.errors import UserError
from mlxgpt.model import GPT, attention_weights, causal_mask
from mlxgpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_MASK_SIZE = 8
MAX_MASK_SIZE = 256  # a bigger mask picture is a grey blur
MAX_EXAMPLE_SIZE = 64  # the worked example prints one line per key position
EXAMPLE_HEAD_SIZE = 16  # d, the length of the random query/key vectors in the example
DPI = 120
ALLOWED_COLOR = "#3b75af"
MASKED_COLOR = "#e4e4e4"


class VizError(UserError, ValueError):
    """A ``viz`` option the user can fix."""


def token_label(text: str) -> str:
    """A token made visible on an axis: newline as ⏎, space as ␣, tab as ⇥."""
    return text.replace("\n", "⏎").replace(" ", "␣").replace("\t", "⇥")


def new_figure(**kwargs) -> Figure:
    """A figure drawn by the file-only Agg canvas, without pyplot or its global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the PNG is exactly the figure size
    return path


# -- the mask and the worked example --------------------------------------------------------


@dataclass
class MaskExample:
    """One query row of attention, step by step (all arrays have ``size`` entries)."""

    size: int
    row: int  # the query position i
    seed: int | None  # of the random vectors; None: the scores were given
    scores: np.ndarray  # raw scores q_i . k_j / sqrt(d)
    mask: np.ndarray  # row i of causal_mask(size, size): 0 or the most negative float32
    probs: np.ndarray  # softmax(scores + mask), as computed by the model's attention_weights


def check_size(size: int, limit: int, what: str) -> None:
    if not 1 <= size <= limit:
        raise VizError(f"--size must be between 1 and {limit} for {what}, got {size}")


def check_row(row: int | None, size: int) -> int:
    """The query row of the worked example: ``row``, or by default the middle one."""
    row = (size - 1) // 2 if row is None else row
    if not 0 <= row < size:
        raise VizError(
            f"--row must be between 0 and {size - 1} (a mask of {size} positions), got {row}"
        )
    return row


def mask_example(size: int, row: int | None = None, seed: int = 0) -> MaskExample:
    """Attention of query ``row`` (default: the middle row) over ``size`` positions.

    The queries and keys are seeded random vectors, so the numbers are reproducible but
    not hand-picked; the probabilities come from :func:`mlxgpt.model.attention_weights`
    with the real :func:`causal_mask`, exactly as in the model.
    """
    check_size(size, MAX_EXAMPLE_SIZE, "the worked example")
    row = check_row(row, size)
    q_key, k_key = mx.random.split(mx.random.key(seed))
    shape = (1, 1, size, EXAMPLE_HEAD_SIZE)  # (batch, heads, positions, d), as in the model
    q = mx.random.normal(shape, key=q_key)
    k = mx.random.normal(shape, key=k_key)
    scale = 1.0 / math.sqrt(EXAMPLE_HEAD_SIZE)
    scores = ((q * scale) @ k.transpose(0, 1, 3, 2))[0, 0, row]
    mask = causal_mask(size, size)
    probs = attention_weights(q, k, mask, scale)[0, 0, row]
    return MaskExample(size, row, seed, np.array(scores), np.array(mask[row]), np.array(probs))


def scores_example(scores: Sequence[float], row: int | None = None) -> MaskExample:
    """The worked example for raw scores the reader chose (e.g. the numbers of a lesson).

    ``scores[j]`` is query ``row``'s raw score for key ``j``, so ``len(scores)`` is the
    number of positions. They go through the model's own
    :func:`mlxgpt.model.attention_weights` with the real :func:`causal_mask`: the keys
    are the unit vectors ``e_j`` and the query row is the score vector, so with scale 1
    ``q . k_j`` is exactly ``scores[j]``.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise VizError(f"--scores must be a list of finite numbers, got {list(scores)}")
    size = values.size
    if not 1 <= size <= MAX_EXAMPLE_SIZE:
        raise VizError(f"--scores takes 1 to {MAX_EXAMPLE_SIZE} numbers (one per key), got {size}")
    row = check_row(row, size)
    q = np.zeros((1, 1, size, size), dtype=np.float32)  # (batch, heads, positions, d = size)
    q[0, 0, row] = values
    k = np.eye(size, dtype=np.float32)[None, None]
    mask = causal_mask(size, size)
    probs = attention_weights(mx.array(q), mx.array(k), mask, 1.0)[0, 0, row]
    return MaskExample(size, row, None, q[0, 0, row], np.array(mask[row]), np.array(probs))


def format_mask_example(ex: MaskExample) -> str:
    """The worked example as text: one line per key position, then the checks."""
    i, n = ex.row, ex.size
    masked = ex.mask != 0
    past = f"j = 0..{i}" if i else "j = 0"
    future = f"j = {i + 1}..{n - 1}" if i + 2 < n else f"j = {n - 1}"
    if ex.seed is None:
        source = "Raw scores as given (--scores)."
    else:
        source = f"Query and key vectors are random (seed {ex.seed}, d = {EXAMPLE_HEAD_SIZE})."
    lines = [
        f"Worked example: query position i = {i} of {n} (positions count from 0).",
        source,
        "",
        f"step 1  raw scores     s_j = q_{i} . k_j / sqrt(d), for every key j",
        f"step 2  apply the mask s_j + M[{i}, j]: 0 for {past}"
        + (f", -inf for the future ({future})" if masked.any() else " (no future keys here)"),
        "step 3  softmax        p_j = exp(s_j - max) / sum_k exp(s_k - max)",
        "",
        f"{'key j':>5}  {'raw score':>10}  {'mask':>5}  {'masked score':>12}  {'probability':>11}",
    ]
    for j in range(n):
        if masked[j]:
            mask, score, note = "-inf", "-inf", "  (future: exactly 0)"
        else:
            mask, score, note = "0", f"{ex.scores[j] + ex.mask[j]:.4f}", ""
        lines.append(
            f"{j:5d}  {ex.scores[j]:10.4f}  {mask:>5}  {score:>12}  {ex.probs[j]:11.6f}{note}"
        )
    lines += ["", f"sum of probabilities: {ex.probs.astype(np.float64).sum():.6f}"]
    if masked.any():
        zeros = "all exactly 0" if np.all(ex.probs[masked] == 0) else "NOT all 0"
        lines[-1] += f"; masked (future) keys: {zeros}"
        lines += [
            f"(-inf is shown for readability: causal_mask adds {ex.mask.min():.4g}, the most",
            " negative float32, so exp() gives exactly 0 and a row can never become NaN.)",
        ]
    else:
        lines.append("(this is the last row: every key is in the past, nothing is masked)")
    return "\n".join(lines)


def draw_mask(size: int, row: int | None = None) -> Figure:
    """The ``size`` x ``size`` causal mask: allowed cells blue, masked (future) cells grey."""
    check_size(size, MAX_MASK_SIZE, "the mask picture")
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    allowed = np.array(causal_mask(size, size)) == 0
    side = min(10.0, max(5.0, 0.45 * size + 2.0))
    fig = new_figure(figsize=(side, side + 0.8), layout="constrained")
    ax = fig.subplots()
    ax.imshow(allowed, cmap=ListedColormap([MASKED_COLOR, ALLOWED_COLOR]), vmin=0, vmax=1)
    if size <= 16:  # write the additive mask value into each cell
        for i in range(size):
            for j in range(size):
                ax.text(
                    j,
                    i,
                    "0" if allowed[i, j] else "−∞",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if allowed[i, j] else "#777777",
                )
    if size <= 32:
        ax.set_xticks(range(size))
        ax.set_yticks(range(size))
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("key position j (the token being looked at)")
    ax.set_ylabel("query position i (the token doing the looking)")
    handles = [
        Patch(color=ALLOWED_COLOR, label="allowed: j ≤ i (mask adds 0)"),
        Patch(color=MASKED_COLOR, label="masked: the future, j > i (mask adds −∞ → weight 0)"),
    ]
    if row is not None:
        ax.add_patch(Rectangle((-0.5, row - 0.5), size, 1, fill=False, ec="#d62728", lw=2.5))
        handles.append(
            Patch(fill=False, ec="#d62728", lw=2, label=f"worked example: row i = {row}")
        )
    fig.legend(handles=handles, loc="outside lower center", frameon=False, fontsize=9)
    fig.suptitle(f"Causal mask, {size} x {size}: position i may attend only to j ≤ i")
    return fig


def mask_command(
    size: int | None = None,
    out: str | None = None,
    row: int | None = None,
    scores: Sequence[float] | None = None,
) -> tuple[Path, MaskExample | None]:
    """``mlxgpt viz mask``: write the mask PNG and print the worked example (size <= 64).

    With ``scores`` the example uses them (one per position, so they set the size) instead
    of random vectors; ``row`` picks the query row (default: the middle one).
    """
    if scores is not None:
        if size is not None and size != len(scores):
            raise VizError(
                f"--size {size} does not match the {len(scores)} scores given: leave --size "
                "out (the scores set it)"
            )
        example = scores_example(scores, row)
        size = example.size
    else:
        size = DEFAULT_MASK_SIZE if size is None else size
        check_size(size, MAX_MASK_SIZE, "the mask picture")
        example = mask_example(size, row) if size <= MAX_EXAMPLE_SIZE else None
        row = check_row(row, size) if row is not None else None
    shown_row = row if example is None else example.row
    path = _save(draw_mask(size, shown_row), out or f"causal_mask_{size}.png")
    if example is not None:
        print(format_mask_example(example))
    else:
        print(f"(the worked example is printed for sizes up to {MAX_EXAMPLE_SIZE}; try --size 8)")
    print(f"\nwrote {path} ({size} x {size} causal mask)")
    return path, example


# -- attention of a trained model ---------------------------------------------------------


@dataclass
class AttentionMaps:
    """What :func:`draw_attention` shows: one ``(T, T)`` map per layer and head."""

    tokens: list[str]  # axis labels, one per position (see token_label)
    weights: np.ndarray  # (n_layer, n_head, T, T) float32; rows are queries, columns keys
    dropped: int  # tokens cut from the front of the prompt to fit the context window


def future_positions(T: int) -> np.ndarray:
    """``(T, T)`` booleans, True above the diagonal: keys in the query's future."""
    return np.triu(np.ones((T, T), dtype=bool), k=1)


def compute_attention(model: GPT, tokenizer: Tokenizer, prompt: str) -> AttentionMaps:
    """Attention weights of ``model`` reading ``prompt`` (its last ``block_size`` tokens)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise VizError('the prompt is empty: give some text with --prompt "..."')
    block_size = model.config.block_size
    dropped = max(0, len(ids) - block_size)
    ids = ids[dropped:]
    maps = model.attention_maps(mx.array([ids], dtype=mx.int32))
    weights = np.stack([np.array(m[0]) for m in maps])
    tokens = [token_label(tokenizer.decode([i]) or tokenizer.hf.id_to_token(i)) for i in ids]
    return AttentionMaps(tokens, weights, dropped)


def draw_attention(maps: AttentionMaps, title: str = "") -> Figure:
    """A grid of heatmaps: one row per layer, one column per head, tokens on both axes.

    Cells above the diagonal that are exactly 0 are drawn grey (masked future); any
    non-zero weight there would show in colour, so the picture cannot hide a leak.
    """
    from matplotlib import colormaps

    n_layer, n_head, T, _ = maps.weights.shape
    panel = min(5.0, max(2.2, 0.12 * T + 0.9))  # inches per heatmap
    fig = new_figure(figsize=(n_head * panel + 1.4, n_layer * panel + 1.2), layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True)
    cmap = colormaps["viridis"].with_extremes(bad=MASKED_COLOR)
    future = future_positions(T)
    labelled = T <= 48  # beyond that, token labels overlap: keep numeric ticks
    wide = any(len(t) > 1 for t in maps.tokens)  # multi-character (BPE) labels: rotate
    image = None
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            w = maps.weights[layer, head]
            image = ax.imshow(
                np.ma.masked_where(future & (w == 0), w),
                cmap=cmap,
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
            )
            ax.set_title(f"layer {layer} · head {head}", fontsize=10)
            if labelled:
                ax.set_xticks(range(T), maps.tokens, fontsize=8, rotation=90 if wide else 0)
                ax.set_yticks(range(T), maps.tokens, fontsize=8)
            if head == 0:
                ax.set_ylabel("query (looking)")
            if layer == n_layer - 1:
                ax.set_xlabel("key (looked at)")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (each row sums to 1)")
    fig.suptitle(
        title + ("\n" if title else "") + "grey: masked future positions (weight exactly 0)",
        fontsize=11,
    )
    return fig


def attention_command(
    checkpoint: str, prompt: str, out: str | None = None
) -> tuple[Path, AttentionMaps]:
    """``mlxgpt viz attention``: write the attention grid PNG of a checkpoint."""
    from mlxgpt.model_io import load_model

    model, tokenizer, _ = load_model(checkpoint)
    maps = compute_attention(model, tokenizer, prompt)
    n_layer, n_head, T, _ = maps.weights.shape
    if maps.dropped:
        print(
            f"note: the prompt has {T + maps.dropped} tokens; showing its last {T} "
            f"(the context window, block_size={T})"
        )
    shown = prompt if len(prompt) <= 40 else "..." + prompt[-37:]  # the end is what is drawn
    fig = draw_attention(maps, f"Attention weights of {checkpoint} for {shown!r}")
    path = _save(fig, out or "attention.png")
    w = maps.weights
    above = float(np.abs(w[..., future_positions(T)]).max(initial=0.0))
    row_err = float(np.abs(w.sum(axis=-1) - 1.0).max())
    print(
        f"{n_layer} layers x {n_head} heads, {T} tokens: largest weight above the diagonal "
        f"{above:g}, rows sum to 1 within {row_err:.1e}"
    )
    print(f"wrote {path}")
    return path, maps
