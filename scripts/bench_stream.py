"""Benchmark: cost of streaming one more token of text after n tokens, old vs new way.

Generation turns each new token id into text with :class:`mlxgpt.tokenizer.StreamDecoder`.
The old decoder re-decoded every id generated so far on every token, so a token cost
O(n); the current one decodes a window of a few ids. For each n this prints the time per
token of both, measured side by side (interleaved rounds, same tokens, same process), and
their ratio, for the character and the byte-level BPE tokenizer:

    python scripts/bench_stream.py [--sizes 1000 10000 100000] [--tokens 50] [--rounds 5]

The text is the bundled Tiny Shakespeare with some multi-byte characters and emoji mixed in.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from mlxgpt.data import Corpus
from mlxgpt.tokenizer import StreamDecoder, Tokenizer

EXTRA = " 私は学校へ行く 😀👍🏽 café "  # so byte-level pieces that split a character occur


class RedecodeAll:
    """The old StreamDecoder: decode every id so far on each push (O(n) per token)."""

    def __init__(self, tokenizer: Tokenizer, ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(ids)
        self.emitted = len(tokenizer.decode(self.ids))

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def corpus_ids(tokenizer: Tokenizer, text: str, count: int) -> list[int]:
    ids = tokenizer.encode(text)
    while len(ids) < count:
        ids += ids
    return ids[:count]


def per_token_ms(push: Callable[[int], str], tokens: list[int], out: list[str]) -> float:
    start = time.perf_counter()
    for token in tokens:
        out.append(push(token))
    return (time.perf_counter() - start) * 1e3 / len(tokens)


def measure(tokenizer: Tokenizer, ids: list[int], n: int, tokens: int, rounds: int) -> dict:
    """ms/token of both decoders for the ``tokens`` ids after the first ``n``, interleaved."""
    old = RedecodeAll(tokenizer, ids[:n])
    new = StreamDecoder(tokenizer)
    for token in ids[:n]:
        new.push(token)
    chunk = max(1, tokens // rounds)
    times: dict[str, list[float]] = {"old": [], "new": []}
    texts: dict[str, list[str]] = {"old": [], "new": []}
    for r in range(rounds):
        part = ids[n + r * chunk : n + (r + 1) * chunk]
        times["old"].append(per_token_ms(old.push, part, texts["old"]))
        times["new"].append(per_token_ms(new.push, part, texts["new"]))
    texts["new"].append(new.flush())
    if "".join(texts["old"]) != "".join(texts["new"]):
        raise AssertionError(f"the two decoders disagree after {n} ids")
    old_ms, new_ms = (sorted(times[k])[len(times[k]) // 2] for k in ("old", "new"))
    return {"n": n, "old_ms": old_ms, "new_ms": new_ms, "ratio": old_ms / new_ms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--tokens", type=int, default=50, help="tokens timed per size and decoder")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median is shown)")
    p.add_argument("--data", default="data/tinyshakespeare.txt")
    p.add_argument("--chars", type=int, default=200_000, help="corpus characters to use")
    args = p.parse_args(argv)
    text = "".join(Corpus(args.data).pieces())[: args.chars].replace("\n\n", "\n\n" + EXTRA)
    tokenizers = {
        "char": Tokenizer.train_char([text]),
        "bpe": Tokenizer.train_bpe([text], vocab_size=1024),
    }
    total = max(args.sizes) + args.tokens
    print(
        "| tokenizer | ids so far | re-decode all ids (old) | StreamDecoder (new) | new faster by |"
    )
    print("|---|---|---|---|---|")
    for kind, tokenizer in tokenizers.items():
        ids = corpus_ids(tokenizer, text, total)
        for n in args.sizes:
            row = measure(tokenizer, ids, n, args.tokens, args.rounds)
            print(
                f"| {kind} | {n:,} | {row['old_ms']:.3f} ms/token | "
                f"{row['new_ms']:.4f} ms/token | {row['ratio']:,.0f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
