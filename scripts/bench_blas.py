"""Benchmark: MLX on a Linux CPU with and without mlxgpt's optimized-BLAS loader.

Runs each configuration in its own process (the BLAS is chosen when MLX is loaded) and
prints one table with ratios measured side by side:

    python scripts/bench_blas.py [--sizes 512 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, sys, time
mode, sizes, steps = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
result = {}
if mode == "numpy":
    import numpy as np
    for n in sizes:
        a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
        a @ b
        t = time.perf_counter(); reps = 5
        for _ in range(reps): a @ b
        result[f"matmul{n}"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
else:
    import mlxgpt, mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
    from mlxgpt.config import load_train_config
    from mlxgpt.model import GPT
    from mlxgpt.train import loss_fn
    result["blas"] = mlxgpt.blas.status()["library"] or "reference (mlx-cpu wheel)"
    for n in sizes:
        a = mx.random.normal((n, n)); b = mx.random.normal((n, n)); mx.eval(a @ b)
        t = time.perf_counter(); reps = 5
        for _ in range(reps): mx.eval(a @ b)
        result[f"matmul{n}"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    cfg = load_train_config(None, {})  # the default tiny-char preset
    model = GPT(cfg.model); opt = optim.AdamW(1e-3)
    step = nn.value_and_grad(model, loss_fn)
    x = mx.random.randint(0, 65, (cfg.batch_size, cfg.model.block_size))
    def one():
        loss, g = step(model, x, x); opt.update(model, g); mx.eval(loss, model.parameters())
    one()
    t = time.perf_counter()
    for _ in range(steps): one()
    tokens = cfg.batch_size * cfg.model.block_size * steps
    result["train_tok_s"] = tokens / (time.perf_counter() - t)
print(json.dumps(result))
"""


def run(mode: str, sizes: list[int], steps: int) -> dict:
    env = dict(os.environ)
    if mode == "mlx-reference":
        env["MLXGPT_BLAS"] = "off"
    if mode == "mlx-mlxgpt-1thread":
        env["OPENBLAS_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, ",".join(map(str, sizes)), str(steps)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=8, help="training steps to time")
    args = parser.parse_args()
    modes = ("mlx-reference", "mlx-mlxgpt", "mlx-mlxgpt-1thread", "numpy")
    rows = {m: run(m, args.sizes, args.steps) for m in modes}
    ref = rows["mlx-reference"]
    cols = [f"matmul{n}" for n in args.sizes]
    print(
        f"{'configuration':<16}"
        + "".join(f"{c + ' GFLOP/s':>22}" for c in cols)
        + f"{'train tok/s (default)':>26}"
    )
    for name, r in rows.items():
        line = f"{name:<20}"
        for c in cols:
            line += f"{r[c]:>12.1f} ({r[c] / ref[c]:>5.1f}x)    "
        if "train_tok_s" in r:
            line += f"{r['train_tok_s']:>14,.0f} ({r['train_tok_s'] / ref['train_tok_s']:.1f}x)"
        else:
            line += f"{'-':>14}"
        print(line)
    print(f"\nmlx-mlxgpt BLAS: {rows['mlx-mlxgpt']['blas']}")
    print("ratios are relative to mlx-reference (MLXGPT_BLAS=off), measured in this run")


if __name__ == "__main__":
    main()
