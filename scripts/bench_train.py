"""Benchmark: training speed of mlxgpt vs the same GPT in PyTorch, side by side.

    python scripts/bench_train.py                         # default preset + nanoGPT shape
    python scripts/bench_train.py --shapes nanogpt --rounds 5 --json out/bench_train.json

mlxgpt runs its real training loop (``mlxgpt.train.train``, the compiled step of
mlxgpt/train.py) on the bundled corpus; its per-step tokens/s come from the run's
``log.jsonl``. PyTorch (eager, 2.x) trains the same network, written below in nanoGPT's
layout: token + position embeddings, pre-LayerNorm blocks, ``scaled_dot_product_attention``
with ``is_causal``, exact GELU (or tanh GELU, as configured), tied LM head, AdamW with weight
decay on 2-D weights only, gradient clipping at 1.0, float32, dropout 0. Before timing, the
PyTorch model is loaded with mlxgpt's initial weights and must give the same logits.

The two run interleaved (round 1: mlxgpt, PyTorch; round 2: mlxgpt, PyTorch; ...) so that
a noisy machine slows both alike; each round's median over the steps after ``--warmup``
is reported, with the ratio mlxgpt / PyTorch per round. MFU is model FLOPs per token
(nanoGPT's 6 N + 12 L d T) times tokens/s over the best float32 matmul rate measured in
the same run (1024^3, both frameworks, fastest of 10 at the start of every round).
PyTorch is optional (``pip install -e ".[bench]"``: ``torch==2.13.0``); without it the
script says so and measures mlxgpt alone. ``--with-mlx-functions`` adds a third
contender: the same mlxgpt loop with MLX's own GELU/softmax/loss/LayerNorm.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mlxgpt  # binds the optimized BLAS before mlx.core loads: import MLX after this

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "tinyshakespeare.txt"

# name -> preset and the shape trained; "tiny" is for the smoke test
SHAPES = {
    "default": dict(preset="tiny-char", batch=32, n_layer=4, n_head=4, n_embd=128, block_size=64),
    "nanogpt": dict(
        preset="shakespeare-char", batch=12, n_layer=6, n_head=6, n_embd=384, block_size=256
    ),
    "tiny": dict(preset="tiny-char", batch=4, n_layer=1, n_head=2, n_embd=16, block_size=8),
}


def train_config(name: str, steps: int, out_dir: str):
    """The preset's training config at the benchmark shape, float32, dropout 0."""
    from mlxgpt.config import load_train_config

    s = SHAPES[name]
    model = {k: s[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    return load_train_config(
        s["preset"],
        {
            "data": str(CORPUS),
            "out_dir": out_dir,
            "batch_size": s["batch"],
            "max_iters": steps,
            "warmup_iters": 0,
            "eval_interval": steps,
            "eval_iters": 1,
            "ckpt_interval": steps,
            "dtype": "float32",
            "model": {**model, "dropout": 0.0},
        },
    )


def time_mlxgpt_steps(name: str, steps: int, warmup: int, cpu_forms: bool = True) -> list[float]:
    """Tokens/s of each step after ``warmup`` of a real ``mlxgpt.train.train`` run.

    ``cpu_forms=False`` runs the same loop with MLX's own functions and MLX's default
    32 MB buffer cache, i.e. without what mlxgpt/kernels.py and ``train()`` add on a CPU.
    """
    import mlx.core as mx

    from mlxgpt import kernels
    from mlxgpt.train import train

    chosen = kernels.use_cpu_forms
    if not cpu_forms:
        kernels.use_cpu_forms = lambda size=None: False
        mx.set_cache_limit(32 << 20)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(train_config(name, warmup + steps, tmp), progress=False, quiet=True)
            log = (Path(tmp) / "log.jsonl").read_text()
    finally:
        kernels.use_cpu_forms = chosen
    rows = [json.loads(line) for line in log.splitlines()]
    return [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][warmup:]


# ---------------------------------------------------------------------------------------
# The same GPT in PyTorch (nanoGPT's layout), built only when torch is installed.


def torch_gpt(cfg):
    """A PyTorch module with mlxgpt's parameter names and shapes for ``cfg`` (a GPTConfig)."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    bias = cfg.bias

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=bias)
            self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, cfg.n_head, c // cfg.n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=bias)
            self.gelu = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
            self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=bias)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=bias)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=bias)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=bias)

        def forward(self, idx):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # LM head tied to wte

    return GPT()


def load_mlx_weights(torch_model, mlx_model) -> None:
    import torch
    from mlx.utils import tree_flatten

    weights = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(mlx_model.parameters())}
    torch_model.load_state_dict(weights, strict=True)


def check_same_model(name: str) -> float:
    """Max |logit difference| between mlxgpt's GPT and the PyTorch one with its weights."""
    import mlx.core as mx
    import torch

    from mlxgpt.model import GPT

    cfg = model_config(name)
    mlx_model = GPT(cfg)
    torch_model = torch_gpt(cfg)
    load_mlx_weights(torch_model, mlx_model)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size))
    ours = np.array(mlx_model(mx.array(idx)))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(idx)).numpy()
    return float(np.max(np.abs(ours - theirs)))


def time_torch_steps(name: str, steps: int, warmup: int) -> list[float]:
    """Tokens/s of each PyTorch eager training step after ``warmup``."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    tcfg = train_config(name, steps, "unused")
    cfg = model_config(name)
    torch.manual_seed(0)
    model = torch_gpt(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=(tcfg.beta1, tcfg.beta2))
    rng = np.random.default_rng(0)
    b, t = tcfg.batch_size, cfg.block_size
    rates = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        xy = torch.from_numpy(rng.integers(0, cfg.vocab_size, (b, t + 1)))
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        loss.item()
        rates.append(b * t / (time.perf_counter() - t0))
    return rates[warmup:]


# ---------------------------------------------------------------------------------------


@functools.cache
def vocab_size() -> int:
    """The character vocabulary of the corpus (what ``mlxgpt train`` builds from it)."""
    from mlxgpt.data import Corpus
    from mlxgpt.tokenizer import Tokenizer

    return Tokenizer.train_char(Corpus(CORPUS).pieces()).vocab_size


def model_config(name: str):
    from mlxgpt.config import GPTConfig

    cfg = train_config(name, 1, "unused").model
    return GPTConfig(**{**cfg.__dict__, "vocab_size": vocab_size()})


def flops_per_token(name: str) -> float:
    """nanoGPT's estimate: 6 N + 12 L d T (N: parameters without position embeddings)."""
    from mlxgpt.model import GPT

    cfg = model_config(name)
    n = GPT(cfg).num_params(non_embedding=True)
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def matmul_gflops(framework: str, n: int = 1024, repeats: int = 10) -> float:
    """Float32 n x n x n matmul rate of the fastest of ``repeats`` runs (the peak)."""
    if framework == "torch":
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
        run = lambda: a @ b  # noqa: E731
    else:
        import mlx.core as mx

        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        run = lambda: mx.eval(a @ b)  # noqa: E731
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def machine() -> dict:
    import mlx.core as mx

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "blas": mlxgpt.blas.status().get("library"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        info["torch"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(
    shapes: list[str], steps: int, warmup: int, rounds: int, with_mlx_functions: bool = False
) -> dict:
    have_torch = _have_torch()
    result: dict = {"machine": machine(), "steps": steps, "warmup": warmup, "rounds": rounds}
    if not have_torch:
        print("PyTorch is not installed (pip install torch==2.13.0): measuring mlxgpt alone.")
    peaks = {"mlx": 0.0, "torch": 0.0} if have_torch else {"mlx": 0.0}
    per_shape = {}
    for name in shapes:
        entry = {"flops_per_token": flops_per_token(name), "mlxgpt": [], "torch": []}
        if with_mlx_functions:
            entry["mlxgpt_mlx_functions"] = []
        if have_torch:
            entry["max_logit_diff"] = check_same_model(name)
            if entry["max_logit_diff"] > 1e-3:
                raise SystemExit(f"PyTorch model differs from mlxgpt's ({entry['max_logit_diff']})")
        per_shape[name] = entry
    for _ in range(rounds):
        for fw in peaks:  # the best rate seen in any round
            peaks[fw] = max(peaks[fw], matmul_gflops(fw))
        for name in shapes:
            e = per_shape[name]
            e["mlxgpt"].append(statistics.median(time_mlxgpt_steps(name, steps, warmup)))
            if with_mlx_functions:
                rates = time_mlxgpt_steps(name, steps, warmup, cpu_forms=False)
                e["mlxgpt_mlx_functions"].append(statistics.median(rates))
            if have_torch:
                e["torch"].append(statistics.median(time_torch_steps(name, steps, warmup)))
    result["matmul_gflops_1024"] = peaks
    peak = max(peaks.values())
    for e in per_shape.values():
        for fw in ("mlxgpt", "torch"):
            if e[fw]:
                e[f"{fw}_mfu"] = [r * e["flops_per_token"] / (peak * 1e9) for r in e[fw]]
        if e["torch"]:
            e["ratio"] = [a / b for a, b in zip(e["mlxgpt"], e["torch"], strict=True)]
        if e.get("mlxgpt_mlx_functions"):
            pairs = zip(e["mlxgpt"], e["mlxgpt_mlx_functions"], strict=True)
            e["speedup_over_mlx_functions"] = [a / b for a, b in pairs]
    result["shapes"] = per_shape
    result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"


def print_table(result: dict) -> None:
    m = result["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; mlx {m['mlx']}, "
        f"torch {m.get('torch')}; BLAS {m['blas']}; load average {m['load_average']}"
    )
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in result["matmul_gflops_1024"].items())
    print(f"float32 matmul 1024^3 GFLOP/s, best of the run: {peaks} (MFU against the best)")
    print(
        f"{result['rounds']} interleaved rounds, median of steps {result['warmup'] + 1}.. "
        f"{result['warmup'] + result['steps']} per round; ranges over rounds\n"
    )
    print("| shape | mlxgpt tok/s | MFU | PyTorch eager tok/s | MFU | mlxgpt / PyTorch |")
    print("|---|---|---|---|---|---|")
    for name, e in result["shapes"].items():
        row = [name, _range(e["mlxgpt"], ",.0f"), _range(e["mlxgpt_mfu"], ".1%")]
        if e["torch"]:
            row += [_range(e["torch"], ",.0f"), _range(e["torch_mfu"], ".1%")]
            row.append(_range(e["ratio"], ".2f") + "x")
        else:
            row += ["-", "-", "-"]
        print("| " + " | ".join(row) + " |")
    if any("mlxgpt_mlx_functions" in e for e in result["shapes"].values()):
        print("\n| shape | mlxgpt with MLX's own functions tok/s | mlxgpt tok/s | speed-up |")
        print("|---|---|---|---|")
        for name, e in result["shapes"].items():
            simple = _range(e["mlxgpt_mlx_functions"], ",.0f")
            ours, gain = _range(e["mlxgpt"], ",.0f"), _range(e["speedup_over_mlx_functions"], ".2f")
            print(f"| {name} | {simple} | {ours} | {gain}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["default", "nanogpt"])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=8, help="steps dropped first (compilation)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="out/bench_train.json", help="where to write the results")
    ap.add_argument(
        "--with-mlx-functions",
        action="store_true",
        help="also time mlxgpt with MLX's own GELU/softmax/loss/LayerNorm (the step before "
        "mlxgpt/kernels.py), interleaved",
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="BLAS and PyTorch threads (default: theirs); 1 is steadier on a shared machine",
    )
    args = ap.parse_args()
    if args.threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # read when MLX loads the BLAS
        if _have_torch():
            import torch

            torch.set_num_threads(args.threads)
    result = run(args.shapes, args.steps, args.warmup, args.rounds, args.with_mlx_functions)
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    print_table(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
