"""Greedy generation side by side: mlxgpt-ort, onnxruntime-genai, MLX and transformers.

One model (random weights of a preset's shape, or a checkpoint), one set of prompts, every
contender timed in turn in each round, so a busy machine slows all of them alike:

* ``mlxgpt-ort``: :class:`mlxgpt_export.runtime.OnnxGPT` on each export of the model --
  portable and fused attention in float32, and the int8 / float16 exports when
  ``mlxgpt export`` offers them (``--quantize int8``, ``--dtype float16``: detected from
  its options, otherwise reported as not available); with the KV cache, and without it
  (batch 1 only: every step recomputes the whole sequence);
* ``genai``: onnxruntime-genai on the same export folders, loaded as they are;
* ``MLX``: :mod:`mlxgpt.generate` with and without its KV cache (batch 8: a greedy loop
  over the same model and cache);
* ``transformers``: PyTorch ``GPT2LMHeadModel.generate`` on the ``mlxgpt export-hf``
  folder of the same weights.

For each contender and batch size: time to the first new token (prefill of the prompt plus
one step), decode tokens/s after it (all rows), the ratio to mlxgpt-ort (portable, float32,
KV cache), how many greedy tokens agree with it, the largest |logit difference| from it on
the first prompt, and peak memory: the resident-set high-water mark of a fresh process that
imports the contender's libraries, resets the mark, then loads the model and generates once
(Linux ``/proc``: ``VmHWM`` after writing 5 to ``clear_refs``), shown as the growth over the
process's size before loading. A second table compares mlxgpt-ort with genai on each export
(median of per-round ratios). ``--context`` adds KV cache vs recomputation at the end of
the window; ``--session-options`` times onnxruntime settings; ``--binding`` times ways to
carry the KV cache from one step to the next. Every contender computes on one thread
(:func:`one_thread_each`). The machine (CPU, cores, load, versions) is printed and written
to the JSON::

    python scripts/bench_infer.py --json infer.json      # 6x6x384, context 512: 128 + 256 new
    python scripts/bench_infer.py --rounds 5 --context --session-options --binding
    python scripts/bench_infer.py --preset tiny-char --set block_size=64 --prompt 32 --new 31
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import mlxgpt  # noqa: F401  (loads the fast BLAS before MLX)
from mlxgpt.checkpoint import (
    expected_shapes,
    read_config,
    resolve,
    write_atomic_dir,
    write_json,
)
from mlxgpt.config import GPTConfig, load_train_config
from mlxgpt.sampling import SamplingParams
from mlxgpt.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)
BASE = "mlxgpt-ort portable float32"  # the row every ratio and agreement refers to
PRECISION_FLAGS = {"int8": ("--quantize", "int8"), "float16": ("--dtype", "float16")}
Run = tuple[list[list[int]], float, float]  # tokens of every row, seconds to first, total


def random_checkpoint(directory: Path, config: GPTConfig) -> Path:
    """A checkpoint with GPT-2-like random weights (numpy only) and a char tokenizer."""
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


def timed(tokens: Iterator[list[int]]) -> Run:
    """Drain a generator of per-step token lists: (rows, seconds to the first step, total)."""
    start = time.perf_counter()
    steps = [next(tokens)]
    first = time.perf_counter()
    steps.extend(tokens)
    total = time.perf_counter() - start
    rows = [[t for t in row if t is not None] for row in zip(*steps, strict=True)]
    return rows, first - start, total


# -- contenders: each builds from a JSON-able spec (the memory probe rebuilds it in a child) --
class OrtContender:
    """mlxgpt-ort on one export folder, with or without the KV cache."""

    @staticmethod
    def imports() -> None:
        import mlxgpt_export.runtime  # noqa: F401

    def __init__(
        self, folder: str, cache: bool = True, options: dict | None = None, in_place: bool = True
    ):
        from mlxgpt_export.runtime import OnnxGPT

        self.model = OnnxGPT.load(folder)
        if options:  # a session built with other settings (--session-options)
            self.model = OnnxGPT(
                session_with(self.model.model_path, **options),
                self.model.config,
                self.model.tokenizer,
                self.model.generation,
            )
        self.model.in_place = in_place  # False: decode on the exported graph (Concat cache)
        if cache:  # made now, as loading: not inside the first token (recomputing: unused)
            self.model.in_place_session()
        self.cache = cache

    def steps(self, prompts: np.ndarray, new: int) -> Iterator[list[int]]:
        if len(prompts) == 1:
            ids = self.model.generate_ids(prompts[0].tolist(), new, GREEDY, self.cache)
            return ([t] for t in ids)
        assert self.cache, "batched generation always keeps the KV cache"
        return iter(self.model.generate_batch_ids(prompts.tolist(), new, GREEDY))

    def run(self, prompts: np.ndarray, new: int) -> Run:
        return timed(self.steps(prompts, new))

    def logits(self, prompt: np.ndarray) -> np.ndarray:
        return self.model.forward(prompt[None])[0][0].astype(np.float32)


def session_with(path: Path, threads: int = 0, spinning: bool = True, **settings: Any):
    """An onnxruntime session with ``threads`` intra-op threads and other SessionOptions."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    if "level" in settings:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["level"])
    if "mem_pattern" in settings:
        options.enable_mem_pattern = settings["mem_pattern"]
    if "arena" in settings:
        options.enable_cpu_mem_arena = settings["arena"]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class GenaiContender:
    """onnxruntime-genai on the export folder as it is (``og.Model(folder)``)."""

    @staticmethod
    def imports() -> None:
        import onnxruntime_genai  # noqa: F401

    def __init__(self, folder: str):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(folder)

    def steps(self, prompts: np.ndarray, new: int) -> Iterator[list[int]]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(batch_size=len(prompts), max_length=prompts.shape[1] + new)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(prompts.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield generator.get_next_tokens().tolist()

    def run(self, prompts: np.ndarray, new: int) -> Run:
        return timed(self.steps(prompts, new))

    def logits(self, prompt: np.ndarray) -> None:
        return None


class MlxContender:
    """MLX (:mod:`mlxgpt.generate`) with or without its KV cache."""

    @staticmethod
    def imports() -> None:
        import mlxgpt.generate  # noqa: F401

    def __init__(self, ckpt: str, cache: bool = True):
        from mlxgpt.model_io import load_model

        self.model, _, _ = load_model(ckpt)
        self.cache = cache

    def batch_steps(self, prompts: np.ndarray, new: int) -> Iterator[list[int]]:
        """Greedy decoding of equal-length prompts as one batch over one KV cache."""
        import mlx.core as mx

        from mlxgpt.model import make_cache

        cache = make_cache(self.model)
        tokens = mx.array(prompts)
        for _ in range(new):
            tokens = mx.argmax(self.model(tokens, cache=cache)[:, -1], axis=-1)[:, None]
            yield tokens[:, 0].tolist()

    def run(self, prompts: np.ndarray, new: int) -> Run:
        from mlxgpt.generate import generate_tokens

        if len(prompts) == 1:
            ids = generate_tokens(self.model, prompts[0].tolist(), new, GREEDY, self.cache)
            return timed([t] for t in ids)
        assert self.cache, "batch 8 runs with the KV cache only"
        return timed(self.batch_steps(prompts, new))

    def logits(self, prompt: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        return np.array(self.model(mx.array(prompt[None]))[0])


class HfContender:
    """transformers ``GPT2LMHeadModel.generate`` (PyTorch, KV cache) on the export-hf folder."""

    @staticmethod
    def imports() -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def __init__(self, folder: str):
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(1)  # see one_thread_each
        self.model = GPT2LMHeadModel.from_pretrained(folder).eval()

    def run(self, prompts: np.ndarray, new: int) -> Run:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class FirstToken(BaseStreamer):  # generate() puts the prompt, then each new token
            def __init__(self) -> None:
                self.puts, self.at = 0, 0.0

            def put(self, value: Any) -> None:
                self.puts += 1
                self.at = self.at or (time.perf_counter() if self.puts == 2 else 0.0)

            def end(self) -> None:
                pass

        ids, clock = torch.from_numpy(prompts), FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        total = time.perf_counter() - start
        return out[:, prompts.shape[1] :].tolist(), clock.at - start, total

    def logits(self, prompt: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(prompt[None])).logits[0].numpy()


KINDS = {"ort": OrtContender, "genai": GenaiContender, "mlx": MlxContender, "hf": HfContender}


def build(spec: dict) -> Any:
    args = {k: v for k, v in spec.items() if k not in ("kind", "name", "batches")}
    return KINDS[spec["kind"]](**args)


# -- the model, its exports, the contenders -------------------------------------------------
def export_precisions() -> dict[str, tuple[str, ...]]:
    """The precisions ``mlxgpt export`` offers besides float32, with the flags asking for them."""
    from mlxgpt.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {
        flag: action.choices
        for action in commands.choices["export"]._actions
        for flag in action.option_strings
    }
    offered = {}
    for precision, (flag, value) in PRECISION_FLAGS.items():
        if flag in options and (options[flag] is None or value in options[flag]):
            offered[precision] = (flag, value)
    return offered


def export_folder(ckpt: Path, out: Path, form: str, flags: tuple[str, ...] = ()) -> str | None:
    """Export with the ``mlxgpt export`` command line; ``None`` if it worked, else its error."""
    from mlxgpt.cli import main as mlxgpt_main

    if (out / "config.json").is_file():  # exported by an earlier section of this run
        return None
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        status = mlxgpt_main(["export", str(ckpt), str(out), "--attention", form, *flags])
    return None if status == 0 else captured.getvalue().strip().splitlines()[-1]


def each_export(ckpt: Path, tmp: Path) -> Iterator[tuple[str, Path | str]]:
    """(name, folder) of every export compared ("portable float32", ...), or (name, why
    there is none): exported once into ``tmp``, reused by later sections."""
    offered = export_precisions()
    exports = [(f, "float32") for f in ("portable", "fused")]
    exports += [("portable", p) for p in PRECISION_FLAGS]
    for form, precision in exports:
        name = f"{form} {precision}"
        if precision != "float32" and precision not in offered:
            yield name, f"`mlxgpt export` has no {PRECISION_FLAGS[precision][0]}"
            continue
        folder = tmp / f"{form}-{precision}"
        error = export_folder(ckpt, folder, form, offered.get(precision, ()))
        yield name, folder if error is None else f"export failed: {error}"


def contender_specs(ckpt: Path, tmp: Path, args: argparse.Namespace) -> tuple[list, dict]:
    """Every contender's spec, and what is not available (name -> reason)."""
    from mlxgpt.hf import export_hf

    batches = tuple(args.batch)
    specs: list[dict] = []
    missing: dict[str, str] = {}
    for name, folder in each_export(ckpt, tmp):
        if isinstance(folder, str):
            missing[f"mlxgpt-ort {name}"] = folder
            continue
        form, precision = name.split()
        ort = dict(kind="ort", name=f"mlxgpt-ort {name}", folder=str(folder))
        specs.append(dict(ort, batches=batches))
        if precision == "float32":  # without the cache: batch 1 only
            specs.append(dict(ort, name=f"mlxgpt-ort {name} no cache", cache=False, batches=(1,)))
        if (form, precision) == ("portable", "float32"):  # the graph as exported, as genai runs it
            concat = dict(ort, name=f"mlxgpt-ort {name} concat cache", in_place=False)
            specs.append(dict(concat, batches=batches))
        specs.append(dict(kind="genai", name=f"genai {name}", folder=str(folder), batches=batches))
    specs.append(dict(kind="mlx", name="MLX", ckpt=str(ckpt), batches=batches))
    specs.append(dict(kind="mlx", name="MLX no cache", ckpt=str(ckpt), cache=False, batches=(1,)))
    hf = export_hf(ckpt, tmp / "hf")
    specs.append(dict(kind="hf", name="transformers (PyTorch)", folder=str(hf), batches=batches))
    return [s for s in specs if wanted(s["name"], args)], missing


def wanted(name: str, args: argparse.Namespace) -> bool:
    """``--only`` / ``--skip``: a contender whose name holds one of the words."""
    return any(w in name for w in args.only) and not any(w in name for w in args.skip)


# -- measuring ------------------------------------------------------------------------------
def prompts_for(config: GPTConfig, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, config.vocab_size, (batch, length))


def rounds(
    contenders: dict[str, Any], jobs: list[tuple[str, int]], prompts: dict, new: int, n: int
) -> dict[tuple[str, int], list[Run]]:
    """Run every (contender, batch) job once per round; each round starts one job later.

    Every job first runs once untimed (two new tokens): first-call costs stay out.
    """
    runs: dict[tuple[str, int], list[Run]] = {job: [] for job in jobs}
    for name, batch in jobs:
        contenders[name].run(prompts[batch], 2)
    for r in range(n):
        for name, batch in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
            print(f"round {r + 1}/{n}: {name}, batch {batch}", file=sys.stderr, flush=True)
            runs[name, batch].append(contenders[name].run(prompts[batch], new))
    return runs


def decode_rate(run: Run) -> float:
    """Tokens/s after the first step, all rows together."""
    rows, first, total = run
    steps = max(len(r) for r in rows)
    return len(rows) * (steps - 1) / (total - first) if steps > 1 else float("nan")


def agreement(rows: list[list[int]], reference: list[list[int]]) -> float:
    """Mean share of each reference row that a contender's row repeats from its start."""
    shares = []
    for row, ref in zip(rows, reference, strict=True):
        pairs = enumerate(zip(row, ref, strict=False))  # genai may stop a row early
        same = next((i for i, (a, b) in pairs if a != b), min(len(row), len(ref)))
        shares.append(same / len(ref))
    return float(np.mean(shares))


def summarize(runs: dict, logits: dict, base: str) -> list[dict]:
    """One row per (contender, batch): medians, ranges, ratio to ``base``, agreement, parity."""
    rows = []
    for (name, batch), samples in runs.items():
        rates = [decode_rate(s) for s in samples]
        firsts = [1e3 * s[1] for s in samples]
        row = dict(contender=name, batch=batch, first_ms=statistics.median(firsts))
        row.update(first_ms_range=(min(firsts), max(firsts)), tokens_per_s=statistics.median(rates))
        row["tokens_per_s_range"] = (min(rates), max(rates))
        if (base, batch) in runs:
            base_rates = map(decode_rate, runs[base, batch])
            ratios = [a / b for a, b in zip(rates, base_rates, strict=True)]
            row["vs_base"] = statistics.median(ratios)
            row["agreement"] = agreement(samples[0][0], runs[base, batch][0][0])
        if logits.get(name) is not None and logits.get(base) is not None:
            row["max_logit_diff"] = float(np.abs(logits[name] - logits[base]).max())
        rows.append(row)
    return rows


def peak_memory(spec: dict, batch: int, prompt: int, new: int, config: GPTConfig) -> dict:
    """RSS high-water of a fresh process that loads ``spec`` and generates once (MiB)."""
    job = dict(spec=spec, batch=batch, prompt=prompt, new=new, vocab=config.vocab_size)
    done = subprocess.run(
        [sys.executable, __file__, "--memory-probe", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(job: dict) -> None:
    """The child of :func:`peak_memory`: imports, reset the high-water mark, load, generate."""
    spec = job["spec"]
    KINDS[spec["kind"]].imports()
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, job["vocab"], (job["batch"], job["prompt"]))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = status_kib("VmRSS")
    build(spec).run(prompts, job["new"])
    peak = status_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024}))


# -- the sections ---------------------------------------------------------------------------
def main_section(ckpt: Path, config: GPTConfig, tmp: Path, args: argparse.Namespace) -> dict:
    specs, missing = contender_specs(ckpt, tmp, args)
    contenders = {s["name"]: build(s) for s in specs}
    jobs = [(s["name"], b) for s in specs for b in s["batches"]]
    prompts = {b: prompts_for(config, b, args.prompt) for b in args.batch}
    logits = {name: c.logits(prompts[1][0]) for name, c in contenders.items()}
    runs = rounds(contenders, jobs, prompts, args.new, args.rounds)
    rows = summarize(runs, logits, BASE)
    if not args.no_memory:
        by_name = {s["name"]: s for s in specs}
        for row in rows:
            spec = by_name[row["contender"]]
            row["memory"] = peak_memory(spec, row["batch"], args.prompt, args.new, config)
    return {"rows": rows, "not_available": missing, "versus_genai": versus_genai(runs)}


def versus_genai(runs: dict) -> list[dict]:
    """mlxgpt-ort / genai decode tokens/s on each export: median of the per-round ratios."""
    out = []
    for (name, batch), samples in runs.items():
        export = name.removeprefix("genai ")
        ours = runs.get(("mlxgpt-ort " + export, batch))
        if not name.startswith("genai ") or ours is None:
            continue
        ratios = [decode_rate(a) / decode_rate(b) for a, b in zip(ours, samples, strict=True)]
        out.append(dict(export=export, batch=batch, ratio=statistics.median(ratios)))
        out[-1]["range"] = (min(ratios), max(ratios))
    return out


def lockstep(first: Iterator[list[int]], second: Iterator[list[int]]) -> tuple[list, list]:
    """Advance two generations one step each in turn; each one's seconds per step.

    A step of one runs between two of the other, so whatever else the machine does slows
    both alike (rounds of whole generations leave seconds between the two)."""
    times: tuple[list[float], list[float]] = ([], [])
    live = [first, second]
    while any(live):
        for index, steps in enumerate(live):
            if steps is None:
                continue
            start = time.perf_counter()
            try:
                next(steps)
            except StopIteration:
                live[index] = None
                continue
            times[index].append(time.perf_counter() - start)
    return times


def lockstep_section(ckpt: Path, config: GPTConfig, tmp: Path, args: argparse.Namespace) -> dict:
    """mlxgpt-ort and genai on each export, generating in lockstep (:func:`lockstep`): per
    round, genai's decode seconds over mlxgpt-ort's for the steps both made after the first
    (mlxgpt-ort's speed relative to genai's); who steps first alternates by round."""
    out = []
    for export, folder in each_export(ckpt, tmp):
        if isinstance(folder, str) or not wanted(f"mlxgpt-ort {export}", args):
            continue
        pair = (OrtContender(str(folder)), GenaiContender(str(folder)))
        for batch in args.batch:
            prompts = prompts_for(config, batch, args.prompt)
            for contender in pair:  # first calls untimed
                contender.run(prompts, 2)
            ratios = []
            for r in range(args.lockstep):
                what = f"lockstep {r + 1}/{args.lockstep}: {export}, batch {batch}"
                print(what, file=sys.stderr, flush=True)
                order = pair if r % 2 == 0 else pair[::-1]
                times = lockstep(*(c.steps(prompts, args.new) for c in order))
                ours, genai = times if r % 2 == 0 else times[::-1]
                n = min(len(ours), len(genai))
                ratios.append(sum(genai[1:n]) / sum(ours[1:n]))
            row = dict(export=export, batch=batch, ratio=statistics.median(ratios))
            row.update(range=(min(ratios), max(ratios)), ahead=sum(x > 1 for x in ratios))
            out.append(dict(row, rounds=len(ratios)))
    return {"rows": out}


def portable_folder(ckpt: Path, tmp: Path) -> Path:
    folder = tmp / "portable-float32"
    if not folder.is_dir():
        export_folder(ckpt, folder, "portable")
    return folder


def context_section(ckpt: Path, config: GPTConfig, tmp: Path, args: argparse.Namespace) -> dict:
    """KV cache vs recomputing the sequence, for the last ``--context-new`` tokens of the window."""
    folder = str(portable_folder(ckpt, tmp))
    contenders = {
        "mlxgpt-ort": OrtContender(folder),
        "mlxgpt-ort no cache": OrtContender(folder, cache=False),
        "MLX": MlxContender(str(ckpt)),
        "MLX no cache": MlxContender(str(ckpt), cache=False),
    }
    contenders = {k: v for k, v in contenders.items() if wanted(k, args)}
    length = config.block_size - args.context_new
    prompts = {1: prompts_for(config, 1, length)}
    runs = rounds(
        contenders, [(name, 1) for name in contenders], prompts, args.context_new, args.rounds
    )
    rows = summarize(runs, {}, "mlxgpt-ort")
    for row in rows:
        uncached = runs.get((row["contender"] + " no cache", 1))
        if uncached:
            pairs = zip(runs[row["contender"], 1], uncached, strict=True)
            row["cache_speedup"] = statistics.median(
                decode_rate(a) / decode_rate(b) for a, b in pairs
            )
    return {"prompt": length, "new": args.context_new, "rows": rows}


# What --session-options compares (the first: the runtime's own default, make_session)
SESSION_OPTIONS: dict[str, dict | None] = {
    "mlxgpt-ort default: 1 thread": None,
    "2 threads, spinning (onnxruntime's default)": dict(threads=0),
    "2 threads, no spinning": dict(threads=2, spinning=False),
    "1 thread, no memory pattern": dict(threads=1, mem_pattern=False),
    "1 thread, no memory arena": dict(threads=1, arena=False),
    "1 thread, basic graph optimizations": dict(threads=1, level="ORT_ENABLE_BASIC"),
    "1 thread, extended graph optimizations": dict(threads=1, level="ORT_ENABLE_EXTENDED"),
}


def options_section(ckpt: Path, config: GPTConfig, tmp: Path, args: argparse.Namespace) -> dict:
    """mlxgpt-ort (portable, float32, KV cache) under different onnxruntime SessionOptions."""
    folder = str(portable_folder(ckpt, tmp))
    contenders = {name: OrtContender(folder, options=o) for name, o in SESSION_OPTIONS.items()}
    prompts = {b: prompts_for(config, b, args.prompt) for b in args.batch}
    jobs = [(name, b) for name in contenders for b in args.batch]
    runs = rounds(contenders, jobs, prompts, args.new, args.rounds)
    return {"rows": summarize(runs, {}, next(iter(SESSION_OPTIONS)))}


def binding_section(ckpt: Path, config: GPTConfig, tmp: Path, args: argparse.Namespace) -> dict:
    """Microseconds per decode step, three ways of carrying the KV cache between steps."""
    from mlxgpt_export.runtime import OnnxGPT

    model = OnnxGPT.load(portable_folder(ckpt, tmp))
    ways: dict[str, Callable[[Any, np.ndarray, int], float]] = {
        "in place: GroupQueryAttention on bound buffers (mlxgpt-ort)": in_place_steps,
        "session.run, numpy in and out (exported graph)": numpy_steps,
        "IO binding, OrtValues": lambda m, ids, new: binding_steps(m, ids, new, False),
        "IO binding, preallocated buffers": lambda m, ids, new: binding_steps(m, ids, new, True),
    }
    out = []
    for batch in args.batch:
        ids = prompts_for(config, batch, args.prompt)
        samples: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                samples[name].append(way(model, ids, args.new))
        for name, values in samples.items():
            out.append(dict(way=name, batch=batch, us_per_step=statistics.median(values)))
            out[-1]["range"] = (min(values), max(values))
    return {"rows": out}


def in_place_steps(model: Any, ids: np.ndarray, new: int) -> float:
    """Decode steps as mlxgpt-ort's generation loops take them; microseconds per step."""
    from mlxgpt_export.runtime import _InPlaceDecoder

    return decode_steps(_InPlaceDecoder(model, len(ids), model.in_place_session()), ids, new)


def numpy_steps(model: Any, ids: np.ndarray, new: int) -> float:
    """Decode steps on the exported graph, its presents fed back as the next pasts."""
    from mlxgpt_export.runtime import _Decoder

    return decode_steps(_Decoder(model, len(ids)), ids, new)


def decode_steps(decoder: Any, ids: np.ndarray, new: int) -> float:
    """Microseconds per greedy decode step of ``decoder`` after the prompt ``ids``."""
    logits = decoder.start(ids, np.ones_like(ids))
    start = time.perf_counter()
    for _ in range(new):
        logits = decoder.extend(np.argmax(logits, axis=-1)[:, None])
    return 1e6 * (time.perf_counter() - start) / new


def binding_steps(model: Any, ids: np.ndarray, new: int, preallocated: bool) -> float:
    """Decode steps through onnxruntime's IOBinding; microseconds per step after the prompt.

    ``preallocated``: every present is written into one of two buffers per tensor sized for
    the whole window (no allocation at all) and read back as the next past from there;
    otherwise onnxruntime allocates the presents and their OrtValues are bound as the pasts.
    """
    from mlxgpt_export import signature as sig

    config, session, dtype = model.config, model.session, model.past_dtype
    (batch, length), heads, size = ids.shape, config.n_head, config.head_size
    binding = session.io_binding()
    pasts = [n for i in range(config.n_layer) for n in sig.past_names(i)]
    presents = [n for i in range(config.n_layer) for n in sig.present_names(i)]
    flat = [
        [np.empty(batch * heads * config.block_size * size, dtype) for _ in "ab"] for _ in pasts
    ]

    def view(buffer: np.ndarray, time: int) -> np.ndarray:
        return buffer[: batch * heads * time * size].reshape(batch, heads, time, size)

    for name in pasts:
        binding.bind_cpu_input(name, np.zeros((batch, heads, 0, size), dtype))
    mask = np.ones((batch, config.block_size), np.int64)
    logits = np.empty((batch, 1, config.vocab_size), np.float32)
    start, tokens = 0.0, ids
    for step in range(new + 1):
        total = length + step
        binding.bind_cpu_input(sig.INPUT_IDS, tokens)
        binding.bind_cpu_input(sig.ATTENTION_MASK, np.ascontiguousarray(mask[:, :total]))
        positions = np.arange(total - tokens.shape[1], total)[None].repeat(batch, 0)
        binding.bind_cpu_input(sig.POSITION_IDS, positions)
        if step:
            binding.bind_output(sig.LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        else:
            binding.bind_output(sig.LOGITS, "cpu")
        for name, pair in zip(presents, flat, strict=True):
            if preallocated:
                out = view(pair[step % 2], total)
                binding.bind_output(name, "cpu", 0, dtype, out.shape, out.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        for name, pair, value in zip(pasts, flat, values[1:], strict=True):
            if preallocated:
                binding.bind_cpu_input(name, view(pair[step % 2], total))
            else:
                binding.bind_ortvalue_input(name, value)
        last = logits[:, -1] if step else values[0].numpy()[:, -1]
        tokens = np.argmax(last, axis=-1)[:, None]
        start = start or time.perf_counter()
    return 1e6 * (time.perf_counter() - start) / new


# -- output ---------------------------------------------------------------------------------
def machine() -> dict:
    """Where and with what the figures were taken."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), cpu)
    packages = ("onnxruntime", "onnxruntime-genai", "mlx", "torch", "transformers", "numpy")
    versions = {}
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu=cpu,
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        load_average=os.getloadavg(),
        versions=versions,
        threads="1 per contender: onnxruntime intra-op, torch.set_num_threads, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} (MLX)",
    )


def fmt_range(values: Iterable[float], spec: str) -> str:
    low, high = values
    return f"{low:{spec}}-{high:{spec}}"


def print_main(result: dict) -> None:
    head = "contender | batch | first token ms | decode tok/s | vs base | agree | max logit diff"
    print(f"\n| {head} | peak RSS MiB (growth) |\n" + "|---" * 8 + "|")
    for r in result["rows"]:
        mem = r.get("memory", {})
        memory = mem.get("error", "-")
        if "peak_mib" in mem:
            memory = f"{mem['peak_mib']:,.0f} (+{mem['growth_mib']:,.0f})"
        print(
            f"| {r['contender']} | {r['batch']} | {r['first_ms']:,.1f} "
            f"({fmt_range(r['first_ms_range'], ',.1f')}) | {r['tokens_per_s']:,.0f} "
            f"({fmt_range(r['tokens_per_s_range'], ',.0f')}) | {cell(r, 'vs_base', '.2f', 'x')} | "
            f"{cell(r, 'agreement', '.0%')} | {cell(r, 'max_logit_diff', '.1e')} | {memory} |"
        )
    for name, why in result["not_available"].items():
        print(f"| {name} | - | not available: {why} | | | | | |")
    print("\n| export | batch | mlxgpt-ort / genai decode tok/s (range) |\n|---|---|---|")
    for r in result["versus_genai"]:
        spread = fmt_range(r["range"], ".2f")
        print(f"| {r['export']} | {r['batch']} | {r['ratio']:.2f}x ({spread}) |")


def cell(row: dict, key: str, spec: str, suffix: str = "") -> str:
    return f"{row[key]:{spec}}{suffix}" if key in row else "-"


def print_rows(title: str, rows: list[dict], extra: tuple[str, str] | None = None) -> None:
    head = "| contender | batch | first token ms | decode tok/s | vs first row |"
    print(f"\n{title}\n\n{head}" + (f" {extra[1]} |" if extra else ""))
    print("|---" * (6 if extra else 5) + "|")
    for r in rows:
        line = (
            f"| {r['contender']} | {r['batch']} | {r['first_ms']:,.1f} | {r['tokens_per_s']:,.0f} "
            f"({fmt_range(r['tokens_per_s_range'], ',.0f')}) | {cell(r, 'vs_base', '.2f', 'x')} |"
        )
        print(line + (f" {cell(r, extra[0], '.1f', 'x')} |" if extra else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("checkpoint", nargs="?", help="default: random weights of --preset")
    add("--preset", default="shakespeare-char", help="shape of the random model")
    add(
        "--set",
        nargs="*",
        default=["block_size=512"],
        metavar="KEY=NUMBER",
        help="GPTConfig overrides of the random model (default: block_size=512)",
    )
    add("--prompt", type=int, default=128, help="prompt tokens")
    add("--new", type=int, default=256, help="new tokens per generation")
    add("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    add("--rounds", type=int, default=3, help="interleaved rounds")
    add("--only", nargs="+", default=[""], help="only contenders whose name holds one of these")
    add("--skip", nargs="+", default=[], help="skip contenders whose name holds one of these")
    add("--no-memory", action="store_true", help="skip the peak-memory probes")
    add("--context", action="store_true", help="KV cache vs recomputation at the window's end")
    add("--context-new", type=int, default=32, help="new tokens timed at the window's end")
    add("--session-options", action="store_true", help="time onnxruntime SessionOptions")
    add("--binding", action="store_true", help="time ways to carry the KV cache between steps")
    add(
        "--lockstep",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="rounds of mlxgpt-ort and genai generating in lockstep, a step each in turn",
    )
    add("--json", type=Path, help="also write everything to this file")
    add("--memory-probe", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> GPTConfig:
    config = load_train_config(args.preset).model
    values = dict(item.split("=", 1) for item in args.set)
    typed = {key: type(getattr(config, key))(value) for key, value in values.items()}
    return dataclasses.replace(config, dropout=0.0, **typed)


@contextlib.contextmanager
def one_thread_each() -> Iterator[None]:
    """Every contender computes on one thread (the environment restored afterwards).

    MLX's BLAS reads ``OPENBLAS_NUM_THREADS`` when MLX first loads (a contender's first
    use); PyTorch is set in :class:`HfContender`; onnxruntime runs one intra-op thread
    (mlxgpt-ort's default, genai's too). On the shared 2-core machine a second thread made
    each of them 2-30x slower (threads spin-waiting for a core another process holds).
    Set ``OPENBLAS_NUM_THREADS`` yourself to measure MLX otherwise.
    """
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        yield
    finally:
        if before is None:
            del os.environ["OPENBLAS_NUM_THREADS"]


def main(argv: list[str] | None = None) -> dict:
    with one_thread_each():
        return run(parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    if args.memory_probe:
        memory_probe(json.loads(args.memory_probe))
        return {}
    result: dict[str, Any] = {"machine": machine(), "settings": {**vars(args), "json": None}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        ckpt = resolve(args.checkpoint) if args.checkpoint else None
        ckpt = ckpt or random_checkpoint(tmp / "ckpt", model_config(args))
        config = read_config(ckpt)
        if args.prompt + args.new > config.block_size:
            sys.exit(
                f"error: --prompt {args.prompt} + --new {args.new} exceed the context window "
                f"{config.block_size}: lower them or raise block_size"
            )
        if args.context and not 1 < args.context_new < config.block_size:
            sys.exit(f"error: --context-new must be 2..{config.block_size - 1}")
        result["model"] = dataclasses.asdict(config)
        sections = {
            "main": main_section,
            "context": context_section,
            "session_options": options_section,
            "binding": binding_section,
            "lockstep": lockstep_section,
        }
        for key, section in sections.items():
            if key == "main" or getattr(args, key):
                result[key] = section(ckpt, config, tmp, args)
    result["machine"]["load_average_end"] = os.getloadavg()
    report(result, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def report(result: dict, args: argparse.Namespace) -> None:
    m = result["machine"]
    loads = zip(m["load_average"], m["load_average_end"], strict=True)
    print(f"{m['date']}  {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}")
    print(
        "load average (1, 5, 15 min) at start / end: "
        + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in loads)
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"threads: {m['threads']}")
    c = result["model"]
    print(
        f"model: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} wide, context "
        f"{c['block_size']}, vocabulary {c['vocab_size']}; greedy, prompt {args.prompt} + "
        f"{args.new} new tokens; median (range) of {args.rounds} interleaved rounds; "
        f"base = {BASE}, KV cache"
    )
    print_main(result["main"])
    if "context" in result:
        ctx = result["context"]
        title = (
            f"KV cache vs recomputation at the end of the window: prompt {ctx['prompt']} "
            f"+ {ctx['new']} new, batch 1"
        )
        print_rows(title, ctx["rows"], ("cache_speedup", "KV cache speed-up"))
    if "session_options" in result:
        title = "onnxruntime SessionOptions (mlxgpt-ort portable float32, KV cache)"
        print_rows(title, result["session_options"]["rows"])
    if "lockstep" in result:
        print(
            "\n| export | batch | mlxgpt-ort / genai decode tok/s in lockstep (range) | "
            "rounds ahead |\n|---|---|---|---|"
        )
        for r in result["lockstep"]["rows"]:
            spread = fmt_range(r["range"], ".3f")
            ahead = f"{r['ahead']} of {r['rounds']}"
            print(f"| {r['export']} | {r['batch']} | {r['ratio']:.3f}x ({spread}) | {ahead} |")
    if "binding" in result:
        print("\n| carrying the KV cache | batch | us per decode step (range) |\n|---|---|---|")
        for r in result["binding"]["rows"]:
            spread = fmt_range(r["range"], ",.0f")
            print(f"| {r['way']} | {r['batch']} | {r['us_per_step']:,.0f} ({spread}) |")


if __name__ == "__main__":
    main()
