"""Where a training step's time goes: each operation's forward + backward, timed alone.

    python scripts/profile_train.py                    # default preset shape
    python scripts/profile_train.py --shape nanogpt    # 6 x 6 x 384, context 256, batch 12

Each row is one operation of the model at the training shape (batch x context tokens),
run as its own compiled function: the forward and the vector-Jacobian product for a
random cotangent (or, for the optimizer, one AdamW update of every parameter). "simple"
is MLX's own function (``nn.gelu``, ``mx.fast.scaled_dot_product_attention``,
``nn.losses.cross_entropy``, ...), "mlxgpt" what the model uses on this device
(:mod:`mlxgpt.kernels` on the CPU); both are timed interleaved in one process. The
"total" row adds the per-layer rows times the layer count; the last row times the real
compiled step of ``mlxgpt.train`` for comparison (its fused graph can be cheaper than the
sum, and includes what the rows leave out: data, gradient sums of tied weights, copies).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import mlxgpt  # noqa: F401  (binds the optimized BLAS before mlx.core loads)
from mlxgpt import kernels
from mlxgpt.config import LAYER_NORM_EPS
from mlxgpt.model import causal_mask
from mlxgpt.train import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, model_config, time_mlxgpt_steps  # noqa: E402

mx = kernels.mx  # mlx.core, imported after mlxgpt (see mlxgpt/blas.py)


def _timed(fn, args, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn(*args)`` (evaluated), after two warm-ups.

    The fastest run is the least disturbed one on a shared machine: an operation's own cost.
    """
    for _ in range(2):
        mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def _fwd_bwd(f):
    """Compiled ``x -> (f(x), vjp)`` for every array argument, cotangent the last argument."""

    def run(*args):
        *primals, cot = args
        out, grads = mx.vjp(f, primals, [cot])
        return out, grads

    return mx.compile(run)


def operations(name: str, cpu_forms: bool):
    """``[(name, count per step, compiled function, args)]`` at the training shape."""
    import mlx.nn as nn

    cfg = model_config(name)
    b, t, c, h = SHAPES[name]["batch"], cfg.block_size, cfg.n_embd, cfg.n_head
    v, n_layer, bias = cfg.vocab_size, cfg.n_layer, cfg.bias
    hs = c // h
    n = lambda *s: mx.random.normal(s)  # noqa: E731
    x, hid = n(b, t, c), n(b, t, 4 * c)
    w = lambda o, i: n(o, i) * 0.02  # noqa: E731
    ln_w, ln_b = mx.ones((c,)), mx.zeros((c,))
    q, k, vv = n(b, h, t, hs), n(b, h, t, hs), n(b, h, t, hs)
    logits, targets = n(b * t, v), mx.random.randint(0, v, (b * t,))
    scale = 1 / math.sqrt(hs)

    if cpu_forms:
        gelu = kernels.gelu

        def attention(q, k, vv):
            s = (q * scale) @ k.transpose(0, 1, 3, 2) + causal_mask(t, t)
            return kernels.softmax(s) @ vv

        def loss(lg):
            return kernels.cross_entropy(lg, targets).mean()
    else:
        gelu = nn.gelu

        def attention(q, k, vv):
            return mx.fast.scaled_dot_product_attention(q, k, vv, scale=scale, mask="causal")

        def loss(lg):
            return nn.losses.cross_entropy(lg, targets, reduction="mean")

    wb = (lambda o: mx.zeros((o,))) if bias else (lambda o: None)  # noqa: E731

    def linear(wt, bb):
        return (lambda x: mx.addmm(bb, x, wt.T)) if bb is not None else (lambda x: x @ wt.T)

    def layer_norm(x):
        norm = kernels.layer_norm if cpu_forms else mx.fast.layer_norm
        return norm(x, ln_w, ln_b if bias else None, LAYER_NORM_EPS)

    def heads(qkv):  # the model's split into heads and back (copies in MLX)
        q, k, v = (z.reshape(b, t, h, hs).transpose(0, 2, 1, 3) for z in mx.split(qkv, 3, axis=-1))
        return (q + k + v).transpose(0, 2, 1, 3).reshape(b, t, c)

    wte_full, wpe_full = w(v, c), w(t, c)
    idx = mx.random.randint(0, v, (b, t))

    def embed(wte, wpe):
        return wte[idx] + wpe[mx.arange(t)]

    per_layer = [
        ("layer norm (x2)", 2, layer_norm, (x,), (b, t, c)),
        ("linear c_attn", 1, linear(w(3 * c, c), wb(3 * c)), (x,), (b, t, 3 * c)),
        ("attention core", 1, attention, (q, k, vv), (b, h, t, hs)),
        ("linear attn c_proj", 1, linear(w(c, c), wb(c)), (x,), (b, t, c)),
        ("linear mlp c_fc", 1, linear(w(4 * c, c), wb(4 * c)), (x,), (b, t, 4 * c)),
        ("GELU", 1, gelu, (hid,), (b, t, 4 * c)),
        ("linear mlp c_proj", 1, linear(w(c, 4 * c), wb(c)), (hid,), (b, t, c)),
        ("residual adds (x2)", 2, lambda a, r: a + r, (x, x), (b, t, c)),
        ("split heads / merge heads", 1, heads, (n(b, t, 3 * c),), (b, t, c)),
    ]
    wte = w(v, c)
    once = [
        ("embeddings (token + position)", 1, embed, (wte_full, wpe_full), (b, t, c)),
        ("final layer norm", 1, layer_norm, (x,), (b, t, c)),
        ("LM head (tied)", 1, lambda x: x @ wte.T, (x.reshape(b * t, c),), (b * t, v)),
        ("cross-entropy loss", 1, loss, (logits,), ()),
    ]
    rows = []
    for name, count, f, args, out_shape in per_layer:
        rows.append((name, count * n_layer, _fwd_bwd(f), (*args, n(*out_shape))))
    for name, count, f, args, out_shape in once:
        rows.append((name, count, _fwd_bwd(f), (*args, n(*out_shape))))
    rows.append(("AdamW update + clip", 1, *_optimizer_step(cfg)))
    return rows


def _optimizer_step(cfg):
    """One clipped AdamW update of a model-sized parameter tree, compiled."""
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    from mlxgpt.config import TrainConfig
    from mlxgpt.model import GPT

    model = GPT(cfg)
    opt = make_optimizer(TrainConfig(max_iters=1000))
    opt.init(model.trainable_parameters())
    grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, model.trainable_parameters())
    state = [model.state, opt.state]

    def update(g):
        g, norm = optim.clip_grad_norm(g, 1.0)
        opt.update(model, g)
        return norm

    return mx.compile(update, inputs=state, outputs=state), (grads,)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    tokens = SHAPES[args.shape]["batch"] * SHAPES[args.shape]["block_size"]
    table = {False: operations(args.shape, False), True: operations(args.shape, True)}
    times = {False: [], True: []}
    for i in range(len(table[False])):
        for forms in (False, True):  # interleaved, row by row
            name, count, fn, fargs = table[forms][i]
            times[forms].append(count * _timed(fn, fargs, args.repeats))
    print(f"shape {args.shape}: {tokens} tokens per step; ms per step (count x ms per call)")
    print("| operation (fwd + bwd) | calls | simple MLX ms | mlxgpt ms | speed-up |")
    print("|---|---|---|---|---|")
    for i, (name, count, _, _) in enumerate(table[False]):
        a, b = times[False][i] * 1e3, times[True][i] * 1e3
        print(f"| {name} | {count} | {a:.1f} | {b:.1f} | {a / b:.1f}x |")
    ta, tb = sum(times[False]) * 1e3, sum(times[True]) * 1e3
    print(f"| **sum** | | {ta:.1f} | {tb:.1f} | {ta / tb:.1f}x |")
    step_ms = tokens / max(time_mlxgpt_steps(args.shape, steps=10, warmup=4)) * 1e3
    print(f"| real compiled step (mlxgpt.train, fastest of 10) | 1 | | {step_ms:.1f} | |")


if __name__ == "__main__":
    main()
