"""float32 vs int8 vs float16 exports of one checkpoint: agreement, logit error, speed.

Each precision is exported with ``mlxgpt export`` (``--quantize int8``, ``--dtype float16``;
``int8, head float32`` is the ablation that leaves the LM head unquantized) and compared
with the float32 export::

    python scripts/bench_precision.py out/tiny-char --prompt "ROMEO:" --prompt "KING" --tokens 256
    python scripts/bench_precision.py --preset shakespeare-char     # random weights

* **greedy agreement**: the float32 export generates ``--tokens`` greedy tokens after each
  ``--prompt``; every other export then predicts each of those positions from the same
  context (teacher forcing, sliding window included) and the share of arg-max tokens equal
  to float32's, pooled over all prompts, is shown, with the largest and mean |logit
  difference| to float32 over those positions;
* **same text for**: how many tokens its own free-running greedy text matches float32's
  (fewest-most over the prompts);
* **decode tok/s**: cached greedy decoding of ``--speed-tokens`` tokens inside the window
  (prompt: the start token), sampling and Python included; **decode step ms**: the graph
  alone (``session.run``), one token after a past of half a window (mean of 20 calls);
  **prefill ms**: a full window. Each precision in turn in every round (interleaved, so
  all share the machine's load), medians of ``--rounds``; "vs float32" is a speed ratio
  (> 1: faster).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import mlxgpt  # noqa: F401  (loads the fast BLAS before MLX)
from mlxgpt.checkpoint import resolve
from mlxgpt.config import load_train_config
from mlxgpt.sampling import SamplingParams
from mlxgpt.tokenizer import prompt_ids
from mlxgpt_export import exporter
from mlxgpt_export import signature as sig
from mlxgpt_export.runtime import OnnxGPT

# name: export_checkpoint options (and whether the int8 head is quantized)
VARIANTS = {
    "float32": ({}, True),
    "int8": ({"quantize": "int8"}, True),
    "int8, head float32": ({"quantize": "int8"}, False),
    "float16": ({"dtype": "float16"}, True),
}
GREEDY = SamplingParams(temperature=0.0)
STEP_REPEATS = 20  # decode steps timed per round


@contextlib.contextmanager
def head_quantized(flag: bool) -> Iterator[None]:
    """The ablation: exporter.QUANTIZE_HEAD set to ``flag`` for one export."""
    saved, exporter.QUANTIZE_HEAD = exporter.QUANTIZE_HEAD, flag
    try:
        yield
    finally:
        exporter.QUANTIZE_HEAD = saved


def teacher_forced_logits(model: OnnxGPT, ids: list[int], start: int) -> np.ndarray:
    """Logits predicting ``ids[t]`` from ``ids[:t]`` (last block_size tokens) for t >= start."""
    block = model.config.block_size
    rows = []
    head = min(len(ids) - 1, block)  # positions whose whole context fits: one pass
    logits, _ = model.forward([ids[:head]])
    rows.extend(logits[0, t - 1] for t in range(start, head + 1))
    for t in range(max(start, head + 1), len(ids)):  # the window slides: one pass each
        logits, _ = model.forward([ids[t - block : t]])
        rows.append(logits[0, -1])
    return np.stack(rows).astype(np.float64)


def agreement(models: dict[str, OnnxGPT], prompts: list[list[int]], tokens: int) -> dict[str, dict]:
    """Teacher-forced arg-max agreement with float32, pooled over every prompt's positions."""
    reference = models["float32"]
    tallies: dict[str, dict] = {n: {"diffs": [], "hits": 0, "same": []} for n in models}
    total = 0
    for prompt in prompts:
        generated = list(reference.generate_ids(prompt, tokens, GREEDY))
        ids = prompt + generated
        ref_logits = teacher_forced_logits(reference, ids, len(prompt))
        total += len(generated)
        for name, model in models.items():
            logits = teacher_forced_logits(model, ids, len(prompt))
            tally = tallies[name]
            tally["diffs"].append(np.abs(logits - ref_logits))
            tally["hits"] += int(np.sum(logits.argmax(-1) == np.array(generated)))
            own = list(model.generate_ids(prompt, tokens, GREEDY))
            pairs = enumerate(zip(own, generated, strict=False))  # a BPE text may end early
            tally["same"].append(
                next((i for i, (a, b) in pairs if a != b), min(len(own), len(generated)))
            )
    out = {}
    for name, tally in tallies.items():
        diffs = np.concatenate([d.ravel() for d in tally["diffs"]])
        out[name] = {
            "agreement": tally["hits"] / total,
            "max_logit_diff": float(diffs.max()),
            "mean_logit_diff": float(diffs.mean()),
            "same_text_tokens": tally["same"],  # per prompt: tokens before the first change
            "tokens": tokens,
            "positions": total,
        }
    return out


def step_feeds(model: OnnxGPT) -> tuple[list[str], dict[str, np.ndarray]]:
    """The session inputs of one decode step: a token after a past of half a window."""
    start_id, past_len = model.tokenizer.start_id, model.config.block_size // 2
    _, past = model.forward([[start_id] * past_len])
    feeds = {
        sig.INPUT_IDS: np.array([[start_id]], np.int64),
        sig.ATTENTION_MASK: np.ones((1, past_len + 1), np.int64),
        sig.POSITION_IDS: np.array([[past_len]], np.int64),
    }
    for i, (key, value) in enumerate(past):
        feeds.update(zip(sig.past_names(i), (key, value), strict=True))
    return sig.output_names(model.config.n_layer), feeds


def timings(models: dict[str, OnnxGPT], tokens: int, rounds: int) -> dict[str, dict]:
    """Median decode tok/s, decode-step ms (the graph alone) and prefill ms, interleaved."""
    kinds = ("decode", "step", "prefill")
    samples = {name: {kind: [] for kind in kinds} for name in models}
    steps = {name: step_feeds(model) for name, model in models.items()}
    for _ in range(rounds):
        for name, model in models.items():
            start_id = model.tokenizer.start_id
            begin = time.perf_counter()
            list(model.generate_ids([start_id], tokens, GREEDY))
            samples[name]["decode"].append(tokens / (time.perf_counter() - begin))
            outputs, feeds = steps[name]
            begin = time.perf_counter()
            for _ in range(STEP_REPEATS):
                model.session.run(outputs, feeds)
            samples[name]["step"].append(1e3 * (time.perf_counter() - begin) / STEP_REPEATS)
            begin = time.perf_counter()
            model.forward([[start_id] * model.config.block_size])
            samples[name]["prefill"].append(1e3 * (time.perf_counter() - begin))
    base = {kind: statistics.median(samples["float32"][kind]) for kind in kinds}
    return {
        name: {
            "decode_tok_s": statistics.median(s["decode"]),
            "decode_range": [min(s["decode"]), max(s["decode"])],
            "decode_vs_float32": statistics.median(s["decode"]) / base["decode"],
            "step_ms": statistics.median(s["step"]),
            "step_speedup": base["step"] / statistics.median(s["step"]),
            "prefill_ms": statistics.median(s["prefill"]),
            "prefill_speedup": base["prefill"] / statistics.median(s["prefill"]),
        }
        for name, s in samples.items()
    }


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in (folder / "onnx").iterdir()) / 1e6


def run(
    ckpt: Path,
    work: Path,
    prompts: list[str],
    tokens: int,
    speed_tokens: int,
    rounds: int,
    attention: str,
    threads: int | None,
) -> list[dict]:
    models, sizes = {}, {}
    for name, (options, quantize_head) in VARIANTS.items():
        folder = work / name.replace(", ", "-").replace(" ", "-")
        with head_quantized(quantize_head):
            exporter.export_checkpoint(ckpt, folder, attention=attention, quiet=True, **options)
        models[name], sizes[name] = OnnxGPT.load(folder, threads=threads), folder_mb(folder)
    tokenizer = models["float32"].tokenizer
    quality = agreement(models, [prompt_ids(tokenizer, p) for p in prompts], tokens)
    block = models["float32"].config.block_size
    speed = timings(models, max(1, min(speed_tokens, block - 1)), rounds)
    return [{"precision": n, "onnx_mb": sizes[n], **quality[n], **speed[n]} for n in VARIANTS]


def print_table(rows: list[dict]) -> None:
    print(
        "| precision | onnx/ MB | greedy agreement | max / mean logit diff | same text for "
        "| decode tok/s (range) | vs float32 | decode step ms | vs float32 | prefill ms "
        "| vs float32 |"
    )
    print("|---" * 11 + "|")
    for r in rows:
        low, high = r["decode_range"]
        print(
            f"| {r['precision']} | {r['onnx_mb']:.3g} | {100 * r['agreement']:.1f}% "
            f"| {r['max_logit_diff']:.2g} / {r['mean_logit_diff']:.2g} "
            f"| {min(r['same_text_tokens'])}-{max(r['same_text_tokens'])} of {r['tokens']} "
            f"| {r['decode_tok_s']:,.0f} ({low:,.0f}-{high:,.0f}) "
            f"| {r['decode_vs_float32']:.2f}x | {r['step_ms']:.3g} | {r['step_speedup']:.2f}x "
            f"| {r['prefill_ms']:.3g} | {r['prefill_speedup']:.2f}x |"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="default: random weights of --preset")
    parser.add_argument("--preset", default="tiny-char", help="shape of the random weights")
    parser.add_argument(
        "--prompt", action="append", help="repeat for several (default: the start token)"
    )
    parser.add_argument("--tokens", type=int, default=256, help="greedy tokens compared")
    parser.add_argument("--speed-tokens", type=int, default=200, help="decode tokens timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--attention", default="portable", choices=["portable", "fused"])
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = resolve(args.checkpoint)
        else:
            from bench_infer import random_checkpoint

            config = dataclasses.replace(load_train_config(args.preset).model, dropout=0.0)
            ckpt = random_checkpoint(Path(tmp) / "ckpt", config)
        rows = run(
            ckpt,
            Path(tmp),
            args.prompt or [""],
            args.tokens,
            args.speed_tokens,
            args.rounds,
            args.attention,
            args.threads,
        )
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
