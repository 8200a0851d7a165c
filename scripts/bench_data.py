"""Tokenizing a large corpus: peak memory and speed of mlxgpt's streamed data preparation.

    python scripts/bench_data.py                      # 1 GB char corpus, 100 MB BPE corpus
    python scripts/bench_data.py --mb 50 --tokenizers char bpe --bpe-mb 50

Writes a synthetic corpus (random words, punctuation, newlines, some non-ASCII) into a
temporary folder, then, each in a fresh process so peak RSS is its own, builds the
tokenizer and the token cache exactly as ``mlxgpt train`` does (``Corpus`` ->
``Tokenizer.train_*`` -> ``Dataset.prepare``) and prints wall time, MB/s and peak RSS.
Side by side on a smaller corpus (``--legacy-mb``, interleaved) it runs the approach used
before (whole corpus read into one string, one ``tokenizer.encode`` call) and prints the
ratios. Everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK_CHARS = 1 << 20


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write about ``megabytes`` MB of word-like text; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = ["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(4000)]
    words += ["café", "naïve", "字", "über", "😀"]
    blocks = []
    for _ in range(8):
        picks = rng.integers(0, len(words), BLOCK_CHARS // 6)
        seps = rng.choice([" ", " ", " ", " ", ", ", ". ", "\n", ".\n\n"], len(picks))
        blocks.append("".join(w + s for w, s in zip(np.array(words)[picks], seps, strict=True)))
    target, size = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            block = blocks[rng.integers(len(blocks))].encode("utf-8")[: target - size]
            block = block.decode("utf-8", errors="ignore")
            f.write(block)
            size += len(block.encode("utf-8"))
    return size


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB


def child(mode: str, kind: str, corpus: str, cache: str, bpe_vocab: int) -> None:
    """Prepare the data in this process and print one JSON line of measurements."""
    from mlxgpt.data import Corpus, Dataset
    from mlxgpt.tokenizer import Tokenizer

    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "streamed":
        c = Corpus(corpus)
        pieces = c.pieces()
        tok = (
            Tokenizer.train_char(pieces)
            if kind == "char"
            else Tokenizer.train_bpe(pieces, bpe_vocab)
        )
        data = Dataset.prepare(c, tok, cache, 0.1, 64)
        tokens = len(data.train) + len(data.val)
    else:  # what data.py did before: the whole corpus in one string, one encode call
        text = Path(corpus).read_text(encoding="utf-8")
        tok = (
            Tokenizer.train_char([text])
            if kind == "char"
            else Tokenizer.train_bpe([text], bpe_vocab)
        )
        ids = np.asarray(tok.encode(text), dtype=np.uint16)
        ids.tofile(Path(cache) / "legacy.bin")
        tokens = len(ids)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "tokens": tokens,
                "peak_mb": peak_rss_mb(),
                "baseline_mb": baseline,
            }
        )
    )


def measure(mode: str, kind: str, corpus: Path, workdir: Path, bpe_vocab: int) -> dict:
    cache = Path(tempfile.mkdtemp(dir=workdir, prefix="cache-"))
    try:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                kind,
                str(corpus),
                str(cache),
                str(bpe_vocab),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, kind: str, mb: float, r: dict) -> str:
    return (
        f"| {label} | {kind} | {mb:,.1f} | {r['seconds']:.1f} | {mb / r['seconds']:.2f} | "
        f"{r['peak_mb']:,.0f} | {r['baseline_mb']:,.0f} | "
        f"{(r['peak_mb'] - r['baseline_mb']) / mb:.2f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=float, default=1000, help="corpus size for char (MB)")
    p.add_argument("--bpe-mb", type=float, help="corpus size for BPE (MB; default min(mb, 100))")
    p.add_argument("--tokenizers", nargs="+", choices=["char", "bpe"], default=["char", "bpe"])
    p.add_argument("--bpe-vocab", type=int, default=512)
    p.add_argument(
        "--legacy-mb", type=float, default=10, help="size of the side-by-side run (0: skip)"
    )
    p.add_argument("--repeats", type=int, default=2, help="interleaved pairs per side-by-side run")
    p.add_argument("--workdir", help="where the temporary corpus goes (default: system temp)")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, kind, corpus, cache, vocab = args.child
        return child(mode, kind, corpus, cache, int(vocab))
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench-data-"))
    try:
        sizes = {"char": args.mb, "bpe": args.bpe_mb or min(args.mb, 100)}
        print(
            "| run | tokenizer | corpus MB | seconds | MB/s | peak RSS MB | RSS after imports MB "
            "| (peak - imports) / corpus MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for kind in args.tokenizers:
            corpus = workdir / f"corpus-{kind}.txt"
            mb = make_corpus(corpus, sizes[kind]) / 1e6
            print(
                row(
                    "streamed", kind, mb, measure("streamed", kind, corpus, workdir, args.bpe_vocab)
                ),
                flush=True,
            )
            corpus.unlink()
        legacy_mb = min(args.legacy_mb, args.mb)
        if legacy_mb > 0:
            ratios = []
            for kind in args.tokenizers:
                corpus = workdir / f"small-{kind}.txt"
                mb = make_corpus(corpus, legacy_mb, seed=1) / 1e6
                for mode in ("legacy", "streamed") * args.repeats:  # interleaved
                    r = measure(mode, kind, corpus, workdir, args.bpe_vocab)
                    print(row(mode, kind, mb, r), flush=True)
                    ratios.append((kind, mode, r))
                corpus.unlink()
            for kind in args.tokenizers:
                best = {
                    m: min(
                        (r for k, mm, r in ratios if k == kind and mm == m),
                        key=lambda r: r["seconds"],
                    )
                    for m in ("legacy", "streamed")
                }
                grow = {m: max(best[m]["peak_mb"] - best[m]["baseline_mb"], 1.0) for m in best}
                memory = grow["streamed"] / grow["legacy"]
                speed = best["legacy"]["seconds"] / best["streamed"]["seconds"]
                print(
                    f"{kind}: streamed / before: peak RSS growth {memory:.3f}x, speed {speed:.2f}x"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
