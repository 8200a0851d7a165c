"""The loss curve of a training run (``OUT_DIR/loss.png``) from its ``log.jsonl``.

Uses matplotlib's object API (a ``Figure`` drawn on an Agg canvas): it never touches
pyplot's global state or switches the backend, so it is safe inside a notebook or a GUI
program that has chosen its own.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_log(log_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    """(step, loss) per training step and (step, train_loss, val_loss) per evaluation;
    lines that are not such records (a line cut by a crash) are skipped."""
    steps, evals = [], []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict) or "step" not in r:
                continue
            if "loss" in r:
                steps.append((r["step"], r["loss"]))
            elif "val_loss" in r:
                evals.append((r["step"], r["train_loss"], r["val_loss"]))
    return steps, evals


def plot_losses(log_path: Path, png_path: Path, title: str) -> Path:
    """Draw the per-step training loss and the evaluations of ``log_path`` into ``png_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, evals = read_log(log_path)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        ax.plot(*zip(*steps, strict=True), lw=0.8, alpha=0.6, label="train (per step)")
    if evals:
        s, t, v = zip(*evals, strict=True)
        ax.plot(s, t, "o-", label="train (eval)")
        ax.plot(s, v, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if steps or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return png_path
