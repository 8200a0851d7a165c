"""Load test of ``mlxgpt-ort serve`` on localhost: continuous batching vs one request at a time.

Starts two servers on the same export (``--max-batch 16``, the default, and
``--max-batch 1``, no batching), then for each number of concurrent clients sends a fixed
number of streamed completions to one server and then the other, in ``--rounds`` rounds
(interleaved, so both see the same machine load; the rounds are pooled), and prints one
table::

    python scripts/bench_serve.py                        # random weights, tiny-char shape
    python scripts/bench_serve.py --export exported/ --clients 1,16 --requests 64

Per row: requests/s, output tokens/s, p50/p99 latency and time to first token (TTFT),
errors (non-200 or a broken connection) and lost requests (a stream without
``data: [DONE]``). Then the ratios the README quotes and whether the targets hold:
16 clients >= 4x the tokens/s of one, p99 TTFT < 1 s at 16 clients, no error, no loss.
Every request has a fixed token budget and the run stops by itself; only 127.0.0.1 is
contacted. The load generator (aiohttp, whose C parser costs about half of httpx's CPU
per streamed token) runs on the same CPUs as the servers, unless ``--server-cpus 0,1``
pins the servers to those CPUs and the load generator to the others
(Linux; as if the clients ran on other machines)::

    python scripts/bench_serve.py --clients 1,16 --server-cpus 0,1 --server-flags --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:
    import aiohttp
except ImportError:  # an optional benchmark dependency
    raise SystemExit(
        "error: scripts/bench_serve.py needs aiohttp (its load generator): "
        'pip install -e ".[bench]"'
    ) from None

from mlxgpt.config import load_train_config
from mlxgpt_export.exporter import export_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import random_checkpoint  # noqa: E402  (random weights of a preset's shape)

PROMPTS = ["ROMEO: ", "JULIET: O ", "KING HENRY: ", "A", "WHAT SAY YOU? ", "TO BE, OR NOT "]
TARGET_RATIO, TARGET_TTFT_S = 4.0, 1.0


class Server:
    """``mlxgpt-ort serve`` in a subprocess on a free port."""

    def __init__(self, folder: Path, *flags: str, cpus: set[int] | None = None):
        pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlxgpt_export", "serve", str(folder), "--port", "0",
             "--log-level", "warning", *flags],
            stdout=subprocess.PIPE, text=True, preexec_fn=pin,  # pinned before it starts
        )  # fmt: skip
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            raise SystemExit(f"the server did not start: {line!r}")
        self.url = line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health"):
                    return
            except OSError:  # not listening yet (URLError is an OSError)
                time.sleep(0.05)
        raise SystemExit("the server did not answer /health")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@dataclasses.dataclass
class Result:
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: bool = False
    lost: bool = False


def budget(i: int, mean: int) -> int:
    """Request ``i``'s max_tokens: 0.5x to 1.5x ``mean`` (requests do not end in step)."""
    return max(1, round(mean * (0.5 + (i % 5) / 4)))


async def one_request(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int) -> Result:
    body = {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": budget(i, max_tokens),
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result, start, done = Result(), time.perf_counter(), False
    try:
        async with session.post(f"{url}/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                return Result(error=True)
            async for raw in response.content:  # one line at a time
                line = raw.rstrip(b"\r\n")
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        result.error = True
                    elif event["choices"] and event["choices"][0]["text"] and result.ttft is None:
                        result.ttft = time.perf_counter() - start
                    elif event.get("usage"):
                        result.tokens = event["usage"]["completion_tokens"]
    except aiohttp.ClientError:
        result.error = True
    result.latency = time.perf_counter() - start
    result.lost = not done and not result.error
    return result


async def load(
    url: str, clients: int, requests: int, max_tokens: int
) -> tuple[list[Result], float]:
    """``clients`` concurrent loops sharing ``requests`` requests; returns results, wall time.

    The client is aiohttp (its HTTP parser is C): the load generator shares the CPUs with
    the servers, and per streamed token it costs about half of what httpx (pure-Python
    h11) costs -- ~45 vs ~90 us of CPU here -- so the table measures less of its own client.
    """
    counter = iter(range(requests))
    results: list[Result] = []
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def loop() -> None:
            for i in counter:
                results.append(await one_request(session, url, i, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(results: list[Result], wall: float) -> dict[str, float]:
    ok = [r for r in results if not r.error and not r.lost]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return {
        "req/s": len(ok) / wall,
        "tok/s": sum(r.tokens for r in ok) / wall,
        "p50 latency s": statistics.median([r.latency for r in ok]) if ok else float("nan"),
        "p99 latency s": percentile([r.latency for r in ok], 99),
        "p50 TTFT s": statistics.median(ttfts) if ttfts else float("nan"),
        "p99 TTFT s": percentile(ttfts, 99),
        "errors": sum(r.error for r in results),
        "lost": sum(r.lost for r in results),
    }


def default_export(directory: Path) -> Path:
    """Random weights in the default model's shape (tiny-char: 4x4x128, context 64)."""
    config = dataclasses.replace(load_train_config(None).model, vocab_size=65, dropout=0.0)
    ckpt = random_checkpoint(directory / "ckpt", config)
    return export_checkpoint(ckpt, directory / "export", quiet=True, verify=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="an export folder (default: random weights)")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrent clients per row")
    parser.add_argument("--requests", type=int, default=128, help="requests per row and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all rows (pooled)")
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="mean tokens per request (0.5x-1.5x)"
    )
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's batch")
    parser.add_argument(
        "--server-cpus",
        help="pin the servers to these CPUs (e.g. 0,1) and the load generator to the others, "
        "as if the clients ran elsewhere (Linux)",
    )
    parser.add_argument(
        "--server-flags", nargs=argparse.REMAINDER, default=[],
        help="the rest of the line goes to both servers (e.g. --threads 1)",
    )  # fmt: skip
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    cpus = pin_load_generator(args.server_cpus) if args.server_cpus else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.export or default_export(Path(tmp))
        queue = str(max(clients) + args.max_batch)  # room for every client: no 503 by design
        batched = ["--max-batch", str(args.max_batch), "--max-queue", queue]
        servers = {
            f"batched ({args.max_batch})": Server(folder, *batched, *args.server_flags, cpus=cpus),
            "unbatched (1)": Server(
                folder, "--max-batch", "1", "--max-queue", queue, *args.server_flags, cpus=cpus
            ),
        }
        try:
            for server in servers.values():  # warm up
                asyncio.run(load(server.url, 2, 4, args.max_tokens))
            runs: dict[tuple[str, int], tuple[list[Result], float]] = {}
            for _ in range(args.rounds):  # interleaved: both servers see the same conditions
                for n in clients:
                    for name, server in servers.items():
                        results, wall = asyncio.run(
                            load(server.url, n, args.requests, args.max_tokens)
                        )
                        before, before_wall = runs.get((name, n), ([], 0.0))
                        runs[name, n] = (before + results, before_wall + wall)
            rows = {key: summarize(results, wall) for key, (results, wall) in runs.items()}
        finally:
            codes = [server.stop() for server in servers.values()]
    print_table(rows, args)
    return report(rows, clients, list(servers), codes)


def pin_load_generator(server_cpus: str) -> set[int]:
    """The servers' CPUs; this process (the load generator) moves to all the others."""
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("error: --server-cpus needs Linux (os.sched_setaffinity)")
    cpus = {int(c) for c in server_cpus.split(",")}
    others = set(range(os.cpu_count() or 1)) - cpus
    if not cpus <= os.sched_getaffinity(0):
        raise SystemExit(f"error: --server-cpus {server_cpus}: this process may only use "
                         f"CPUs {sorted(os.sched_getaffinity(0))}")  # fmt: skip
    if not others:
        raise SystemExit(f"error: --server-cpus {server_cpus}: leave the load generator a CPU")
    os.sched_setaffinity(0, others)
    print(f"servers on CPUs {sorted(cpus)}, load generator on {sorted(others)}")
    return cpus


def print_table(rows: dict, args: argparse.Namespace) -> None:
    columns = list(next(iter(rows.values())))
    print(
        f"\n{args.rounds} x {args.requests} streamed requests per row, max_tokens "
        f"{budget(0, args.max_tokens)}-{budget(4, args.max_tokens)} (mean {args.max_tokens}), "
        "temperature 0.8\n"
    )
    print("| clients | server | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for (name, n), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        cells = [cell(c, row[c]) for c in columns]
        print(f"| {n} | {name} | " + " | ".join(cells) + " |")


def cell(column: str, value: float) -> str:
    """Counts as integers, rates of 1,000 or more to the unit (10,200, not 1.02e+04)."""
    if column in ("errors", "lost") or value >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.3g}"


def report(rows: dict, clients: list[int], names: list[str], codes: list[int]) -> int:
    batched, unbatched = names
    print()
    for n in clients:
        speedup = rows[batched, n]["tok/s"] / rows[unbatched, n]["tok/s"]
        print(f"{n} clients: batched/unbatched tokens/s = {speedup:.2f}x")
    exits = zip(names, codes, strict=True)
    failures = [f"{name} server exited with {code}" for name, code in exits if code]
    failures += [f"{k}: {row['errors']:.0f} errors" for k, row in rows.items() if row["errors"]]
    failures += [f"{k}: {row['lost']:.0f} lost" for k, row in rows.items() if row["lost"]]
    if 1 in clients and 16 in clients:
        ratio = rows[batched, 16]["tok/s"] / rows[batched, 1]["tok/s"]
        ttft = rows[batched, 16]["p99 TTFT s"]
        print(f"batched, 16 clients vs 1: {ratio:.2f}x tokens/s (target >= {TARGET_RATIO}x)")
        print(f"batched, 16 clients: p99 TTFT {ttft:.3f} s (target < {TARGET_TTFT_S} s)")
        if ratio < TARGET_RATIO:
            failures.append(f"16-client tokens/s only {ratio:.2f}x one client's")
        if not ttft < TARGET_TTFT_S:
            failures.append(f"p99 TTFT {ttft:.3f} s at 16 clients")
    print("targets: " + ("all met" if not failures else "MISSED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
