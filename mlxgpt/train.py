"""The training loop: next-token loss at every position, AdamW, cosine schedule, checkpoints.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows of
``block_size`` tokens. The loss is the mean cross-entropy over every position of every
window, computed in one parallel pass; the causal mask inside the model is what keeps
each position from seeing its own target.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map
from tqdm import tqdm

from mlxgpt import kernels
from mlxgpt.checkpoint import CheckpointError, read_json, resolve
from mlxgpt.config import (
    ConfigError,
    TrainConfig,
    load_train_config,
    merge,
    replace,
    train_config_from_dict,
)
from mlxgpt.data import Dataset, read_corpus
from mlxgpt.errors import UserError
from mlxgpt.model import GPT
from mlxgpt.model_io import load_model, load_optimizer_state, load_state, save_checkpoint
from mlxgpt.tokenizer import Tokenizer


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


def loss_fn(model: GPT, x: mx.array, y: mx.array, mask: str = "causal") -> mx.array:
    """Mean next-token cross-entropy over all positions, computed in float32."""
    logits = model(x, mask=mask).astype(mx.float32)
    if kernels.use_cpu_forms(logits.size):  # same function, vectorisable (mlxgpt/kernels.py)
        return kernels.cross_entropy(logits, y).mean()
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW with linear warmup then cosine decay; no weight decay on biases and norms."""
    decay_steps = max(1, cfg.max_iters - cfg.warmup_iters)
    cosine = optim.cosine_decay(cfg.learning_rate, decay_steps, end=cfg.min_lr)
    if cfg.warmup_iters:
        warmup = optim.linear_schedule(
            cfg.learning_rate / cfg.warmup_iters, cfg.learning_rate, cfg.warmup_iters
        )
        schedule = optim.join_schedules([warmup, cosine], [cfg.warmup_iters])
    else:
        schedule = cosine

    def adamw(wd: float) -> optim.AdamW:
        return optim.AdamW(schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=wd)

    return optim.MultiOptimizer(
        [adamw(cfg.weight_decay), adamw(0.0)], [lambda path, w: w.ndim >= 2]
    )


def estimate_loss(
    model: GPT, data: Dataset, cfg: TrainConfig, split: str, mask: str = "causal"
) -> float:
    """Mean loss over ``eval_iters`` batches drawn with a fixed seed (same batches each time)."""
    rng = np.random.default_rng(cfg.seed + 1)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = data.batch(split, cfg.batch_size, model.config.block_size, rng)
        losses.append(loss_fn(model, mx.array(x), mx.array(y), mask).item())
    model.train(was_training)
    return float(np.mean(losses))


def _rng_state_to_json(rng: np.random.Generator) -> dict[str, Any]:
    return json.loads(json.dumps(rng.bit_generator.state, default=int))


def _plot_losses(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["train_loss"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.6, label="train (per step)")
    if evals:
        s, t, v = zip(*evals, strict=True)
        ax.plot(s, t, "o-", label="train (eval)")
        ax.plot(s, v, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"mlxgpt training — {log_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def resolve_config(
    config_path: str | None, overrides: dict[str, Any], resume: str | None
) -> TrainConfig:
    """The run's settings: a fresh config, or the resumed run's own with ``overrides``."""
    if resume is None:
        return load_train_config(config_path, overrides)
    ckpt = resolve(resume)
    if not (ckpt / "train_config.json").is_file():
        raise CheckpointError(f"{ckpt} has no train_config.json: it cannot be resumed")
    saved = read_json(ckpt / "train_config.json")
    saved["stop_at"] = 0  # a resumed run goes on to max_iters unless told otherwise
    try:
        return train_config_from_dict(merge(saved, overrides))
    except ConfigError as err:
        raise CheckpointError(f"cannot resume from {ckpt}: {err}") from None


def train(
    cfg: TrainConfig, resume: str | None = None, progress: bool = True, quiet: bool = False
) -> dict[str, Any]:
    """Run (or continue) training; returns final losses and paths."""
    out_dir = Path(cfg.out_dir)
    say = (lambda *a: None) if quiet else print
    mx.random.seed(cfg.seed)
    data_rng = np.random.default_rng(cfg.seed)
    texts = read_corpus(cfg.data)
    if resume is not None:
        model, tokenizer, ckpt = load_model(resume)
        if model.config != replace(cfg.model, vocab_size=model.config.vocab_size):
            raise CheckpointError(
                f"model settings differ from the checkpoint's ({model.config}); "
                "a resumed run keeps its model shape"
            )
        state = load_state(ckpt)
        step = int(state["step"])
        data_rng.bit_generator.state = state["data_rng"]
        best_val = float(state.get("best_val_loss", math.inf))
        say(f"resuming {ckpt} at step {step}")
    else:
        if cfg.tokenizer == "char":
            tokenizer = Tokenizer.train_char(texts)
        else:
            tokenizer = Tokenizer.train_bpe(texts, cfg.bpe_vocab_size)
        model = GPT(replace(cfg.model, vocab_size=tokenizer.vocab_size))
        step, best_val = 0, math.inf
    cfg = replace(cfg, model=model.config)
    data = Dataset.prepare(
        texts, tokenizer, out_dir / "data", cfg.val_fraction, cfg.model.block_size
    )
    if cfg.dtype == "bfloat16":
        model.set_dtype(mx.bfloat16)
    model.train()

    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    if resume is not None:
        load_optimizer_state(ckpt, optimizer)
    mask = "causal" if cfg.causal_mask else "none"
    loss_and_grad = nn.value_and_grad(model, partial(loss_fn, mask=mask))
    train_state = [model.state, optimizer.state, mx.random.state]

    def update(x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        """One optimizer step over ``grad_accum`` micro-batches stacked on axis 0."""
        total_loss, grads = None, None
        for i in range(cfg.grad_accum):
            loss, g = loss_and_grad(model, x[i], y[i])
            total_loss = loss if total_loss is None else total_loss + loss
            grads = g if grads is None else tree_map(mx.add, grads, g)
        grads = tree_map(lambda g: g / cfg.grad_accum, grads)
        if cfg.grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
        else:
            norm = mx.array(0.0)
        optimizer.update(model, grads)
        return total_loss / cfg.grad_accum, norm

    if cfg.compile:
        update = mx.compile(update, inputs=train_state, outputs=train_state)
    if kernels.use_cpu_forms():
        # MLX's CPU allocator keeps only 32 MB of freed buffers for reuse; a step frees far
        # more, and each buffer handed back to the OS page-faults in again the next step.
        mx.set_cache_limit(mx.get_memory_limit())

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    _truncate_log(log_path, step)
    last = cfg.stop_at if 0 < cfg.stop_at < cfg.max_iters else cfg.max_iters
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.model.block_size
    n_params = model.num_params()
    say(
        f"model: {n_params / 1e6:.2f}M parameters (excluding position embeddings), "
        f"{cfg.model.n_layer} layers x {cfg.model.n_head} heads x {cfg.model.n_embd} wide, "
        f"context {cfg.model.block_size}, vocab {tokenizer.vocab_size} ({tokenizer.kind})"
    )
    say(
        f"data: {data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val tokens; "
        f"{tokens_per_step:,} tokens per step; steps {step} -> {last} of {cfg.max_iters}"
    )

    def checkpoint(step: int, probe: tuple[mx.array, mx.array]) -> None:
        """Save, unless the current weights already produce a NaN/inf loss."""
        probe_loss = loss_fn(model, *probe, mask=mask).item()
        if not math.isfinite(probe_loss):
            raise TrainingDiverged(
                f"the weights after step {step} give a {probe_loss} loss; training stopped "
                f"and this state was not saved. The last good checkpoint in "
                f"{out_dir / 'ckpt'} is intact. Try a lower learning_rate "
                f"(now {cfg.learning_rate}) or grad_clip=1.0."
            )
        save_checkpoint(
            out_dir / "ckpt",
            model,
            tokenizer,
            train_config=cfg.to_dict(),
            optimizer=optimizer,
            state={
                "step": step,
                "best_val_loss": best_val,
                "data_rng": _rng_state_to_json(data_rng),
            },
        )

    result: dict[str, Any] = {"out_dir": str(out_dir), "start_step": step}
    losses: list[float] = []
    bar = tqdm(total=last, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        while step < last:
            t0 = time.perf_counter()
            batches = [
                data.batch("train", cfg.batch_size, cfg.model.block_size, data_rng)
                for _ in range(cfg.grad_accum)
            ]
            x = mx.array(np.stack([b[0] for b in batches]))
            y = mx.array(np.stack([b[1] for b in batches]))
            mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout noise depends on the step only
            loss, norm = update(x, y)
            mx.eval(loss, norm, train_state)
            lr = optimizer.learning_rate.item()  # the rate this step used
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step + 1}; training stopped. The last "
                    f"good checkpoint in {out_dir / 'ckpt'} is intact. Try a lower "
                    f"learning_rate (now {cfg.learning_rate}) or grad_clip=1.0."
                )
            step += 1
            losses.append(loss_value)
            dt = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": norm.item(),
                "tokens_per_s": tokens_per_step / dt,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            bar.update(1)
            evaluate = step % cfg.eval_interval == 0 or step == last
            if evaluate:
                train_loss = estimate_loss(model, data, cfg, "train")
                val_loss = estimate_loss(model, data, cfg, "val")
                best_val = min(best_val, val_loss)
                log.write(
                    json.dumps({"step": step, "train_loss": train_loss, "val_loss": val_loss})
                    + "\n"
                )
                log.flush()
                if not quiet:
                    bar.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
                result.update(train_loss=train_loss, val_loss=val_loss)
            if step % cfg.ckpt_interval == 0 or step == last:
                log.flush()
                checkpoint(step, (x[0], y[0]))
    bar.close()
    elapsed = time.perf_counter() - t_start
    png = out_dir / "loss.png"
    if log_path.stat().st_size:
        _plot_losses(log_path, png)
    result.update(
        step=step,
        elapsed_s=elapsed,
        losses=losses,
        best_val_loss=best_val,
        ckpt=str(out_dir / "ckpt"),
        loss_png=str(png),
        config=asdict(cfg),
        model=model,
        tokenizer=tokenizer,
        data=data,
    )
    return result


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines newer than the checkpoint a run resumes from (or all, when fresh)."""
    if not log_path.exists():
        return
    keep = []
    if step > 0:
        for line in log_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
    log_path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
