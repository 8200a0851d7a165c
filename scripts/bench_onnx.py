"""Benchmark and parity figures: MLX vs the exported ONNX model (both attention forms).

For a checkpoint, or random weights in the shape of a preset, prints one table with the
largest |logit difference| between MLX and onnxruntime (prompt of a full window, one decode
step, a chunk after a past, a left-padded batch) and the speed of prompt processing and of
cached greedy decoding::

    python scripts/bench_onnx.py                          # tiny-char and shakespeare-char shapes
    python scripts/bench_onnx.py out/tiny-char --tokens 100

MLX is optional: without it only the onnxruntime columns are filled.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np

import mlxgpt  # noqa: F401  (loads the fast BLAS before MLX)
from mlxgpt.checkpoint import expected_shapes, resolve, write_atomic_dir, write_json
from mlxgpt.config import GPTConfig, load_train_config
from mlxgpt.sampling import SamplingParams
from mlxgpt.tokenizer import Tokenizer
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import OnnxGPT

HAVE_MLX = importlib.util.find_spec("mlx") is not None
DIFFS = ["prompt", "decode step", "chunk after past", "left-padded batch"]  # max |logit diff|
SPEED = ["mlx prefill ms", "ort prefill ms", "mlx decode tok/s", "ort decode tok/s"]
RATIOS = ["ort/mlx prefill speed", "ort/mlx decode speed"]  # > 1: onnxruntime is faster
COLUMNS = DIFFS + SPEED + RATIOS


def random_checkpoint(directory: Path, config: GPTConfig) -> Path:
    """A checkpoint with GPT-2-like random weights (numpy only)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("bias"):
            weights[name] = rng.normal(0, 0.02, shape)
        elif len(shape) == 1:
            weights[name] = 1 + rng.normal(0, 0.1, shape)
        else:
            weights[name] = rng.normal(
                0, 0.5 if name in ("wte.weight", "wpe.weight") else 0.05, shape
            )
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    chars = [chr(32 + i) for i in range(config.vocab_size)]
    tokenizer = Tokenizer.train_char(["".join(chars)])

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", dataclasses.asdict(config))
        tokenizer.save(tmp / "tokenizer.json")

    return write_atomic_dir(directory, write)


def mlx_parity(ckpt: Path, ort: OnnxGPT) -> dict[str, float]:
    import mlx.core as mx

    from mlxgpt.model import make_cache
    from mlxgpt.model_io import load_model

    model, _, _ = load_model(ckpt)
    V, T = ort.config.vocab_size, ort.config.block_size
    ids = np.random.default_rng(1).integers(0, V, T).tolist()

    def run(chunks: list[list[int]]) -> list[np.ndarray]:
        cache = make_cache(model)
        return [np.array(model(mx.array([c]), cache=cache)[0]) for c in chunks]

    (full,) = run([ids])
    half = T // 2
    first, second = run([ids[:half], ids[half:]])
    out = {"prompt": np.abs(ort.forward([ids])[0][0] - full).max()}
    _, past = ort.forward([ids[:-1]])
    out["decode step"] = np.abs(ort.forward([ids[-1:]], past=past)[0][0, -1] - full[-1]).max()
    _, past = ort.forward([ids[:half]])
    out["chunk after past"] = np.abs(ort.forward([ids[half:]], past=past)[0][0] - second).max()
    short = ids[: T // 3]
    (alone,) = run([short])
    padded = np.zeros((2, T), np.int64)
    padded[0], padded[1, T - len(short) :] = ids, short
    mask = (np.arange(T) >= np.array([[0], [T - len(short)]])).astype(np.int64)
    logits, _ = ort.forward(padded, mask)
    out["left-padded batch"] = max(
        np.abs(logits[0] - full).max(), np.abs(logits[1, -len(short) :] - alone).max()
    )
    return {k: float(v) for k, v in out.items()}


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed(ckpt: Path, ort: OnnxGPT, tokens: int) -> dict[str, float]:
    greedy = SamplingParams(temperature=0.0)
    prompt = [1] * 8
    T = ort.config.block_size
    result = {
        "ort prefill ms": 1e3 * timed(lambda: ort.forward([[1] * T])),
        "ort decode tok/s": tokens / timed(lambda: list(ort.generate_ids(prompt, tokens, greedy))),
    }
    if HAVE_MLX:
        import mlx.core as mx

        from mlxgpt.generate import generate_tokens
        from mlxgpt.model_io import load_model

        model, _, _ = load_model(ckpt)
        result["mlx prefill ms"] = 1e3 * timed(lambda: mx.eval(model(mx.array([[1] * T]))))
        result["mlx decode tok/s"] = tokens / timed(
            lambda: list(generate_tokens(model, prompt, tokens, greedy))
        )
        result["ort/mlx prefill speed"] = result["mlx prefill ms"] / result["ort prefill ms"]
        result["ort/mlx decode speed"] = result["ort decode tok/s"] / result["mlx decode tok/s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="default: random weights, preset shapes")
    parser.add_argument("--tokens", type=int, default=100, help="decode tokens to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoints = {args.checkpoint: resolve(args.checkpoint)}
        else:
            checkpoints = {}
            for preset in ("tiny-char", "shakespeare-char"):
                config = dataclasses.replace(load_train_config(preset).model, dropout=0.0)
                checkpoints[preset] = random_checkpoint(Path(tmp) / preset, config)
        for name, ckpt in checkpoints.items():
            print(f"\n## {name}\n\n| attention | " + " | ".join(COLUMNS) + " |")
            print("|---" * (len(COLUMNS) + 1) + "|")
            for form in ("portable", "fused"):
                out = export_checkpoint(
                    ckpt, Path(tmp) / f"{name}-{form}", attention=form, quiet=True
                )
                ort = OnnxGPT.load(out)
                tokens = min(args.tokens, ort.config.block_size - 8)
                row = {**(mlx_parity(ckpt, ort) if HAVE_MLX else {}), **speed(ckpt, ort, tokens)}
                formats = {
                    **dict.fromkeys(DIFFS, "{:.1e}"),
                    **dict.fromkeys(SPEED, "{:.1f}"),
                    **dict.fromkeys(RATIOS, "{:.1f}x"),
                }
                cells = [formats[c].format(row[c]) if c in row else "-" for c in COLUMNS]
                print(f"| {form} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
