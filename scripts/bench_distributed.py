"""Benchmark: data-parallel training throughput, 1 process vs N ranks on this machine.

Runs the compiled training step of mlxgpt (``mlxgpt.train.make_step_fn``, gradients
averaged with ``mlx.nn.average_gradients``) in one process and in N ranks started by
``mlx.launch --backend ring`` on localhost, alternating the two R times, and prints
tokens/s (all ranks together), the step time, the time one gradient average takes on
its own (the communication per step), and the scaling ratio tokens/s(N) / tokens/s(1).
Each rank computes ``batch_size`` windows per step, so ideal scaling is N. The ranks
share this machine's cores: each gets ``cpu_count // N`` BLAS threads
(``OPENBLAS_NUM_THREADS``, unless set), the single process all of them.

    python scripts/bench_distributed.py [--ranks 2] [--steps 30] [--repeats 3]
                                        [--n-layer 4 --n-embd 128 --block-size 64 --batch-size 32]

On one machine the ranks share its cores and memory bandwidth: a 2-core box cannot show
a speed-up (see README, "Training on several machines").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlxgpt  # noqa: F401  (the fast BLAS is bound before the worker imports MLX)

HERE = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): time ``args.steps`` training steps."""
    import mlx.core as mx
    import numpy as np

    from mlxgpt.config import load_train_config
    from mlxgpt.distributed import init_world
    from mlxgpt.model import GPT
    from mlxgpt.train import make_optimizer, make_step_fn

    cfg = load_train_config(None, config_values(args))
    world = init_world(cfg.dist_timeout)
    mx.random.seed(cfg.seed)
    model = GPT(cfg.model)
    model.update(world.broadcast(model.parameters()))
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    step = make_step_fn(model, optimizer, cfg, world)
    rng = np.random.default_rng([cfg.seed, world.rank])
    shape = (cfg.grad_accum, cfg.batch_size, cfg.model.block_size)
    x = mx.array(rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32))
    y = mx.array(rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, norm = step(x, y)
        mx.eval(loss, norm, model.state, optimizer.state)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    grads = model.trainable_parameters()  # gradient-shaped: what each step averages
    comm = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        mx.eval(world.average_gradients(grads))
        if i >= args.warmup:
            comm.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    if world.is_main:
        tokens = world.size * cfg.batch_size * cfg.grad_accum * cfg.model.block_size
        n_floats = sum(v.size for _, v in _flat(grads))
        print(
            "RESULT "
            + json.dumps(
                {
                    "ranks": world.size,
                    "tok_s": tokens / step_s,
                    "step_ms": step_s * 1e3,
                    "comm_ms": statistics.median(comm) * 1e3 if world.size > 1 else 0.0,
                    "grad_mb": n_floats * 4 / 1e6,
                }
            ),
            flush=True,
        )


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def config_values(args: argparse.Namespace) -> dict:
    return {
        "batch_size": args.batch_size,
        "warmup_iters": 0,
        "model": {
            "n_layer": args.n_layer,
            "n_head": args.n_head,
            "n_embd": args.n_embd,
            "block_size": args.block_size,
            "vocab_size": 65,
        },
    }


def free_ports(n: int) -> int:
    """A port P with P .. P + n - 1 free now (one per local rank of the ring)."""
    for _ in range(200):
        port = random.randint(20_000, 60_000)
        socks = []
        try:
            for p in range(port, port + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def ring_command(ranks: int, command: list[str], *env: str) -> list[str]:
    """``mlx.launch`` (the venv's) running ``command`` as ``ranks`` ranks of a ring on
    localhost, on ports free now; ``env``: ``NAME=value`` settings for every rank."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    settings = [arg for setting in env for arg in ("--env", setting)]
    ports = ["--starting-port", str(free_ports(ranks))]
    return [str(launcher), "--backend", "ring", "-n", str(ranks), *ports, *settings, "--", *command]


def run_once(ranks: int, args: argparse.Namespace) -> dict:
    passed = [
        "--worker",
        *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKER_OPTIONS),
    ]
    command = [sys.executable, str(HERE), *passed]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    if ranks > 1:
        # ranks on one machine share its cores: each gets its share of BLAS threads
        blas = f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS') or threads}"
        command = ring_command(ranks, command, blas)
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # the launcher and its ranks: one process group
    )
    try:
        out, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"{ranks} rank(s) hung for {args.timeout} s") from None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"no result from {ranks} rank(s):\n{out}")


WORKER_OPTIONS = ("steps", "warmup", "n_layer", "n_head", "n_embd", "block_size", "batch_size")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="windows per rank per step")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before failing")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    load_before = os.getloadavg()[0]
    results: dict[int, list[dict]] = {1: [], args.ranks: []}
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        for ranks in (1, args.ranks):
            results[ranks].append(run_once(ranks, args))
    rows = []
    print(
        f"model {args.n_layer}x{args.n_head}x{args.n_embd}, context {args.block_size}, "
        f"{args.batch_size} windows per rank per step; median of {args.repeats} runs of "
        f"{args.steps} steps; {os.cpu_count()} CPU cores; load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after (other processes compete for the cores)\n"
    )
    print(f"{'ranks':>5} {'tokens/s':>10} {'ms/step':>9} {'allreduce ms':>13} {'grads MB':>9}")
    for ranks, runs in results.items():
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append(row)
        print(
            f"{ranks:>5} {row['tok_s']:>10,.0f} {row['step_ms']:>9.1f} "
            f"{row['comm_ms']:>13.2f} {row['grad_mb']:>9.2f}"
        )
    ratio = rows[1]["tok_s"] / rows[0]["tok_s"]
    print(
        f"\nscaling: {args.ranks} ranks give {ratio:.2f}x the tokens/s of 1 (ideal {args.ranks}x)"
    )
    return rows


if __name__ == "__main__":
    main()
