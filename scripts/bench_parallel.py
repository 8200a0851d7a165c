"""Benchmark: the loss at all T positions in one causal pass vs T passes, one per prefix.

    python scripts/bench_parallel.py                  # T = 16 .. 256, default model shape
    python scripts/bench_parallel.py --grad           # loss and its gradient
    python scripts/bench_parallel.py --lengths 16 32 --json out/bench_parallel.json

Training scores every position of a window in one forward pass: the causal mask keeps
position t from seeing tokens after t, so the T next-token losses of one pass are the
losses of T separate models runs on the prefixes ``x[:, :1]``, ``x[:, :2]``, ...,
``x[:, :T]`` (each scoring only its last position). This script computes both for the
same tokens, asserts that the mean losses (and, with ``--grad``, the gradients) agree,
and times them interleaved after one warm-up call each: one pass, then the T prefix
passes, repeated (medians reported). The prefix
loop does T passes of up to T tokens, ~T^2/2 token-passes instead of T: the ratio grows
linearly with T. The model is mlxgpt's GPT at the default preset's width (4 layers x 4
heads x 128) with a 256-token context, random weights, float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import mlxgpt  # binds the optimized BLAS before mlx.core loads: import MLX after this


def one_pass_loss(model, x, y):
    """Mean next-token loss over all positions of ``x``, one forward pass (mlxgpt's loss)."""
    from mlxgpt.train import loss_fn

    return loss_fn(model, x, y)


def prefix_losses(model, x, y):
    """The same mean, from T forward passes: prefix ``x[:, :t]`` scores position t only."""
    import mlx.core as mx
    import mlx.nn as nn

    total = mx.array(0.0)
    for t in range(1, x.shape[1] + 1):
        last = model(x[:, :t])[:, -1].astype(mx.float32)
        total = total + nn.losses.cross_entropy(last, y[:, t - 1], reduction="mean")
        mx.eval(total)  # one pass at a time, as a prefix-by-prefix evaluation would run
    return total / x.shape[1]


def _grad_fn(model, loss):
    import mlx.nn as nn

    return nn.value_and_grad(model, loss)


def measure(model, length: int, batch: int, grad: bool, repeats: int, seed: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed + length)
    tokens = rng.integers(0, model.config.vocab_size, (batch, length + 1))
    x, y = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])
    runs = {"one_pass": one_pass_loss, "prefixes": prefix_losses}
    if grad:
        runs = {k: _grad_fn(model, f) for k, f in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    results = {}
    for f in runs.values():  # warm-up: MLX compiles its kernels for each new shape
        mx.eval(f(model, x, y))
    for _ in range(repeats):  # interleaved
        for name, f in runs.items():
            t0 = time.perf_counter()
            results[name] = f(model, x, y)
            mx.eval(results[name])
            times[name].append(time.perf_counter() - t0)
    one, pre = results["one_pass"], results["prefixes"]
    loss_one, loss_pre = (one[0], pre[0]) if grad else (one, pre)
    diff = abs(loss_one.item() - loss_pre.item())
    if not diff <= 1e-5 * max(1.0, abs(loss_one.item())):
        raise AssertionError(f"T={length}: one-pass loss {loss_one.item()} != {loss_pre.item()}")
    row = {"T": length, "loss": loss_one.item(), "loss_diff": diff}
    if grad:
        g1, g2 = dict(tree_flatten(one[1])), dict(tree_flatten(pre[1]))
        gdiff = max(float(mx.abs(g1[k] - g2[k]).max()) for k in g1)
        if not gdiff <= 1e-4:
            raise AssertionError(f"T={length}: gradients differ by {gdiff}")
        row["grad_diff"] = gdiff
    for name in runs:
        row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
    row["ratio"] = row["prefixes_ms"] / row["one_pass_ms"]
    return row


def build_model(n_layer: int, n_head: int, n_embd: int, block_size: int, seed: int):
    import mlx.core as mx

    from mlxgpt.config import GPTConfig
    from mlxgpt.model import GPT

    mx.random.seed(seed)
    cfg = GPTConfig(
        vocab_size=65, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )
    return GPT(cfg)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad", action="store_true", help="time the loss and its gradient")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=3, default=[4, 4, 128], metavar=("L", "H", "D"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="out/bench_parallel.json", help="where to write the results")
    args = ap.parse_args(argv)
    import mlx.core as mx

    model = build_model(*args.shape, block_size=max(args.lengths), seed=args.seed)
    model.eval()
    rows = []
    what = "loss and gradient" if args.grad else "loss"
    print(f"{what}, batch {args.batch}, model {args.shape[0]}x{args.shape[1]}x{args.shape[2]}")
    extra = " |grad diff| |" if args.grad else ""
    print("| T | one pass ms | T prefix passes ms | prefixes / one pass | |loss diff| |" + extra)
    print("|---|---|---|---|---|" + ("---|" if args.grad else ""))
    for length in args.lengths:
        row = measure(model, length, args.batch, args.grad, args.repeats, args.seed)
        rows.append(row)
        print(
            f"| {length} | {row['one_pass_ms']:.1f} | {row['prefixes_ms']:.1f} | "
            f"{row['ratio']:.1f}x | {row['loss_diff']:.1e} |"
            + (f" {row['grad_diff']:.1e} |" if args.grad else ""),
            flush=True,
        )
    given = sys.argv[1:] if argv is None else argv
    result = {
        "command": " ".join(["bench_parallel.py", *given]),
        "mlx": mx.__version__,
        "blas": mlxgpt.blas.status().get("library"),
        "batch": args.batch,
        "grad": args.grad,
        "shape": args.shape,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
