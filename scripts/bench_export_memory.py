"""Peak memory (RSS) of exporting a GPT-2-sized checkpoint, and of training.

Each measurement runs in a fresh Python process, which reports its own peak resident set
size when it is done (``VmHWM`` in ``/proc/self/status``: Linux only)::

    python scripts/bench_export_memory.py                       # GPT-2 124M: export + training
    python scripts/bench_export_memory.py --shape over-2gib --exports float32 float16 --no-train
    python scripts/bench_export_memory.py --shape tiny --no-train   # seconds (the smoke test)

* **export**: a random checkpoint of the shape (``gpt2``: 12 layers, 12 heads, 768 wide,
  vocab 50257, context 1024 — 124M parameters; written with numpy + safetensors in the
  checkpoint format, with a 50257-character tokenizer), exported by ``export_checkpoint``
  in each variant of ``--exports`` (parity check included, as ``mlxgpt export`` does;
  ``+external`` forces ONNX external data, the way every model above 2 GiB is written).
  ``baseline`` is a process that only imports what the exporter imports; the exporter's
  own cost is ``peak - baseline``, shown per parameter, and the largest model that fits
  in ``--machine-gib`` (less the baseline and 10% headroom) follows from it.
* **train**: ``mlxgpt train`` with the default preset, stopped after ``--train-steps``
  steps (``stop_at``: same schedule, a checkpoint at the end); ``--train-args`` adds
  ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPES = {
    "gpt2": {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768},
    # GPT-2's vocabulary, 30 x 1280: 655M parameters, 2.4 GiB of float32 weights (> 2 GiB:
    # written as external data whatever the option)
    "over-2gib": {
        "vocab_size": 50257,
        "block_size": 1024,
        "n_layer": 30,
        "n_head": 20,
        "n_embd": 1280,
    },
    "tiny": {"vocab_size": 300, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
}
# export_checkpoint options of each measured export; "+external" forces external data, the
# way every model above 2 GiB is written
EXPORTS = {
    "float32": {},
    "float32+external": {"external_data_threshold": 0},
    "int8": {"quantize": "int8"},
    "int8+external": {"quantize": "int8", "external_data_threshold": 0},
    "float16": {"dtype": "float16"},
    "float16+external": {"dtype": "float16", "external_data_threshold": 0},
}
HEADROOM = 0.9  # use at most 90% of the machine's memory

# Run in a child process: its peak RSS, in bytes, is the last line it prints. The peak is
# VmHWM of /proc/self/status (Linux), the high-water mark of this program's own memory:
# ru_maxrss would also count the parent's size at the fork, which exec carries over.
CHILD = """
import json, re, sys, time
job = json.loads(sys.argv[1])
start = time.perf_counter()
if job["kind"] == "export":
    from mlxgpt_export.exporter import export_checkpoint
    export_checkpoint(job["ckpt"], job["out"], quiet=True, **job["options"])
elif job["kind"] == "train":
    from mlxgpt.cli import main
    assert main(["train", *job["args"]]) == 0
else:  # baseline: what the exporter imports, nothing run
    import mlxgpt_export.exporter, onnxruntime.quantization  # noqa: F401
status = open("/proc/self/status").read()
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - start}))
"""


def write_checkpoint(directory: Path, shape: dict) -> tuple[Path, int]:
    """A random checkpoint of ``shape`` (numpy + safetensors) and its parameter count."""
    from safetensors.numpy import save_file

    from mlxgpt.checkpoint import expected_shapes, write_atomic_dir, write_json
    from mlxgpt.config import GPTConfig
    from mlxgpt.tokenizer import Tokenizer

    config = GPTConfig(**shape, activation="gelu_tanh")
    rng = np.random.default_rng(0)
    weights = {}
    for name, dims in expected_shapes(config).items():
        if len(dims) == 1:
            base = 0.0 if name.endswith("bias") else 1.0
            weights[name] = np.full(dims, base, np.float32)
        else:  # GPT-2's initialisation scale, generated in float32 (no float64 copy)
            weights[name] = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
    # one character per token: code points from U+0100 (no surrogates below U+D800)
    tokenizer = Tokenizer.train_char(["".join(map(chr, range(256, 256 + config.vocab_size)))])

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", dataclasses.asdict(config))
        tokenizer.save(tmp / "tokenizer.json")

    return write_atomic_dir(directory, write), sum(w.size for w in weights.values())


def measure(job: dict) -> dict:
    """Run ``job`` in a fresh Python process; its peak RSS and wall time."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{job['kind']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, work: Path) -> dict:
    ckpt, params = write_checkpoint(work / "ckpt", SHAPES[args.shape])
    weights_bytes = (ckpt / "model.safetensors").stat().st_size
    baseline = measure({"kind": "baseline"})["peak_rss"]
    rows = []
    for precision in args.exports:
        out = work / f"out-{precision}"
        figures = measure(
            {"kind": "export", "ckpt": str(ckpt), "out": str(out), "options": EXPORTS[precision]}
        )
        per_param = (figures["peak_rss"] - baseline) / params
        budget = args.machine_gib * 2**30 * HEADROOM - baseline
        written = sum(p.stat().st_size for p in (out / "onnx").iterdir())
        rows.append(
            {
                "precision": precision,
                **figures,
                "bytes_per_param": per_param,
                "largest_params": budget / per_param,
                "onnx_bytes": written,
            }
        )
    report = {
        "shape": args.shape,
        "params": params,
        "checkpoint_bytes": weights_bytes,
        "baseline_rss": baseline,
        "export": rows,
    }
    if args.train_steps:
        steps = args.train_steps
        train_args = [f"out_dir={work / 'train'}", f"stop_at={steps}", *args.train_args]
        report["train"] = {"steps": steps, **measure({"kind": "train", "args": train_args})}
    return report


def print_report(report: dict, machine_gib: float) -> None:
    gb = 2**30
    print(
        f"{report['shape']}: {report['params'] / 1e6:.1f}M parameters, checkpoint "
        f"{report['checkpoint_bytes'] / gb:.2f} GiB; baseline process (imports only) "
        f"{report['baseline_rss'] / gb:.2f} GiB"
    )
    print(
        f"| export | peak RSS | (peak - baseline) / parameter | wall s | onnx/ written "
        f"| largest model in {machine_gib:g} GiB |"
    )
    print("|---|---|---|---|---|---|")
    for r in report["export"]:
        print(
            f"| {r['precision']} | {r['peak_rss'] / gb:.2f} GiB | {r['bytes_per_param']:.1f} B "
            f"| {r['seconds']:.1f} | {r['onnx_bytes'] / gb:.2f} GiB "
            f"| {r['largest_params'] / 1e9:.2f}B parameters |"
        )
    if "train" in report:
        t = report["train"]
        print(
            f"training (default preset, {t['steps']} steps): peak RSS "
            f"{t['peak_rss'] / gb:.2f} GiB, {t['seconds']:.1f} s"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument(
        "--exports",
        nargs="+",
        choices=list(EXPORTS),
        default=["float32", "float32+external", "int8", "int8+external", "float16"],
    )
    parser.add_argument("--train-steps", type=int, default=20, help="0: skip training")
    parser.add_argument("--no-train", dest="train_steps", action="store_const", const=0)
    parser.add_argument(
        "--train-args", nargs="*", default=[], help="key=value overrides (default: none)"
    )
    parser.add_argument("--machine-gib", type=float, default=24.0)
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, Path(tmp))
    print_report(report, args.machine_gib)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
