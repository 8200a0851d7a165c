"""Greedy decoding speed of every client on the same export folder, measured interleaved.

The clients, each loaded with its own standard call on the folder exactly as
``mlxgpt export`` writes it (nothing written by hand):

* ``mlxgpt-ort``: :class:`mlxgpt_export.runtime.OnnxGPT` (this project's runtime);
* ``optimum``: ``ORTModelForCausalLM.from_pretrained`` + ``AutoTokenizer`` (Hugging Face Optimum);
* ``genai``: ``og.Model`` / ``og.Tokenizer`` / ``og.Generator`` (onnxruntime-genai);
* ``transformers.js``: ``AutoModelForCausalLM.from_pretrained`` in Node
  (``@huggingface/transformers``, driven through ``tests/js/generate.mjs``).

Each round times one greedy generation of ``--tokens`` new tokens (prompt: the start
token) with every client and attention form in turn, so all contenders share the same
machine load; the table shows the median tokens/s and the ratio to mlxgpt-ort::

    python scripts/bench_clients.py                       # random weights, tiny-char shape
    python scripts/bench_clients.py out/tiny-char --rounds 9 --json clients.json

The classes here are also what ``tests/test_clients.py`` drives. Sampling settings are never
passed: every client takes the folder's defaults (greedy), written once by the exporter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mlxgpt  # noqa: F401  (loads the fast BLAS before MLX)
from mlxgpt.checkpoint import resolve
from mlxgpt.config import load_train_config
from mlxgpt.sampling import SamplingParams
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import OnnxGPT

REPO = Path(__file__).resolve().parents[1]
NODE_SCRIPT = REPO / "tests" / "js" / "generate.mjs"
FORMS = ("portable", "fused")


def until(ids: Sequence[int], stop: int | None) -> list[int]:
    """``ids`` up to (without) the first ``stop`` token: what a client produced before it ended."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(stop)] if stop is not None and stop in ids else ids


class MlxgptOrt:
    name = "mlxgpt-ort"

    def __init__(self, folder: Path):
        self.model = OnnxGPT.load(folder)

    def encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text)

    def generate(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = self.model.tokenizer.encode(prompt) or [self.model.tokenizer.start_id]
        return list(self.model.generate_ids(ids, max_new_tokens, SamplingParams()))

    def generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        ids = [self.model.tokenizer.encode(p) for p in prompts]
        rows: list[list[int]] = [[] for _ in prompts]
        for step in self.model.generate_batch_ids(ids, max_new_tokens, SamplingParams()):
            for row, token in zip(rows, step, strict=True):
                if token is not None:
                    row.append(token)
        return rows


class Optimum:
    name = "optimum"

    def __init__(self, folder: Path, pad_token: str | None = None, file_name: str | None = None):
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import AutoTokenizer

        extra = {} if pad_token is None else {"pad_token": pad_token}
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        # file_name: the model file of a float16 / int8 export (model_fp16.onnx, ...)
        self.model = ORTModelForCausalLM.from_pretrained(folder, file_name=file_name)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        return output[:, inputs["input_ids"].shape[1] :].tolist()

    def generate(self, prompt: str, max_new_tokens: int) -> list[int]:
        inputs = self.tokenizer(prompt, return_tensors="pt")  # one prompt: no padding
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        return output[0, inputs["input_ids"].shape[1] :].tolist()


class Genai:
    name = "genai"

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.tokenizer = og.Tokenizer(self.model)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _run(self, tokens, batch: int, prompt_length: int, max_new_tokens: int) -> list[list[int]]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(batch_size=batch, max_length=prompt_length + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(tokens)
        rows: list[list[int]] = [[] for _ in range(batch)]
        while not generator.is_done():
            generator.generate_next_token()
            for row, token in zip(rows, generator.get_next_tokens(), strict=True):
                row.append(int(token))
        return rows

    def generate(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        return self._run(ids, 1, len(ids), max_new_tokens)[0]

    def generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        tokens = self.tokenizer.encode_batch(prompts)  # right-padded, genai's convention
        return self._run(tokens, len(prompts), tokens.shape()[1], max_new_tokens)


class TransformersJs:
    """transformers.js in one long-lived Node process (``tests/js/generate.mjs``)."""

    name = "transformers.js"

    def __init__(self) -> None:
        if not (NODE_SCRIPT.parent / "node_modules" / "@huggingface" / "transformers").is_dir():
            raise RuntimeError(
                "transformers.js is not installed: run `npm ci --ignore-scripts` in tests/js"
            )
        self.process = subprocess.Popen(
            ["node", str(NODE_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def run(self, folder: Path, prompts: list[str], max_new_tokens: int, **job) -> dict:
        request = {"folder": str(Path(folder).resolve()), "prompts": prompts}
        request.update(max_new_tokens=max_new_tokens, batch=False, pad_token_id=None)
        request.update(job)
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"transformers.js exited with status {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


# -- the benchmark --------------------------------------------------------------------------
def time_python(client, prompt: str, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    produced = len(client.generate(prompt, tokens))
    return time.perf_counter() - start, produced


def measure(folders: dict[str, Path], tokens: int, rounds: int) -> list[dict]:
    """Median greedy tokens/s of every (client, attention form), rounds interleaved."""
    node = TransformersJs()
    try:
        python = {(c.name, f): c(folders[f]) for f in folders for c in (MlxgptOrt, Optimum, Genai)}
        samples: dict[tuple[str, str], list[float]] = {}
        tokenizer = python[("mlxgpt-ort", FORMS[0])].model.tokenizer
        prompt = tokenizer.hf.id_to_token(tokenizer.start_id)
        for _ in range(rounds):
            for form, folder in folders.items():
                for key, client in python.items():
                    if key[1] == form:
                        seconds, produced = time_python(client, prompt, tokens)
                        samples.setdefault(key, []).append(produced / seconds)
                result = node.run(folder, [prompt], tokens, timed_runs=1)
                produced = len(result["generated"][0])
                samples.setdefault(("transformers.js", form), []).append(
                    produced / result["seconds"][0]
                )
    finally:
        node.close()
    rows = []
    for (name, form), values in samples.items():
        base = statistics.median(samples[("mlxgpt-ort", form)])
        median = statistics.median(values)
        rows.append(
            {"client": name, "attention": form, "tokens_per_s": median, "ratio": median / base}
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| client | attention | greedy tokens/s | vs mlxgpt-ort |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['client']} | {r['attention']} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="default: random weights of --preset")
    parser.add_argument("--preset", default="tiny-char", help="shape of the random model")
    parser.add_argument("--tokens", type=int, default=60, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = resolve(args.checkpoint)
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_infer import random_checkpoint

            config = dataclasses.replace(load_train_config(args.preset).model, dropout=0.0)
            ckpt = random_checkpoint(Path(tmp) / "ckpt", config)
        folders = {
            form: export_checkpoint(ckpt, Path(tmp) / form, attention=form, quiet=True)
            for form in FORMS
        }
        block = OnnxGPT.load(folders["portable"]).config.block_size
        tokens = min(args.tokens, block - 1)  # genai cannot go past the context window
        rows = measure(folders, tokens, args.rounds)
    print(f"greedy decoding, {tokens} new tokens, median of {args.rounds} interleaved rounds")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "rounds": args.rounds, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
