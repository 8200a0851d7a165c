"""Helpers shared by the server tests (this module holds no tests): exports and live servers."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from safetensors.numpy import save_file
from starlette.applications import Starlette
from test_export_support import random_weights, write_random_checkpoint

from mlxgpt.checkpoint import write_atomic_dir, write_json
from mlxgpt.config import GPTConfig
from mlxgpt.tokenizer import Tokenizer
from mlxgpt_export.batching import Limits
from mlxgpt_export.engine_process import ProcessEngine
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import OnnxGPT
from mlxgpt_export.server import create_app, listen, make_server

# Characters " \n", a-z and A-S; a 32-token window, so long generations slide.
CHAR_CONFIG = GPTConfig(vocab_size=47, block_size=32, n_layer=2, n_head=2, n_embd=16)
BPE_CORPUS = "The quick brown fox jumps over the lazy dog. 私は学校へ行く。 🙂 " * 20


def char_export(directory: Path) -> Path:
    """A random-weight character model exported to ``directory``."""
    ckpt = write_random_checkpoint(directory.parent / f"{directory.name}-ckpt", CHAR_CONFIG)
    return export_checkpoint(ckpt, directory, quiet=True, verify=False)


def bpe_export(directory: Path) -> Path:
    """A random-weight byte-level BPE model (it has an end-of-text token) exported."""
    tokenizer = Tokenizer.train_bpe([BPE_CORPUS], 300)
    config = dataclasses.replace(CHAR_CONFIG, vocab_size=tokenizer.vocab_size)
    weights = random_weights(config, seed=1)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", dataclasses.asdict(config))
        tokenizer.save(tmp / "tokenizer.json")

    ckpt = write_atomic_dir(directory.parent / f"{directory.name}-ckpt", write)
    return export_checkpoint(ckpt, directory, quiet=True, verify=False)


ENGINES = ("process", "thread")  # where decoding runs: serve's child process, or a thread


def make_engine(model: OnnxGPT, limits: Limits, engine: str) -> ProcessEngine | None:
    """``mlxgpt-ort serve``'s engine for ``model`` (``"process"``), or ``None``: the app's
    default, a thread of this process (``"thread"``, serve's fallback off POSIX)."""
    if engine == "thread":
        return None
    return ProcessEngine(model, limits.max_batch, limits.max_queue)


@contextlib.contextmanager
def running_server(
    model: OnnxGPT, limits: Limits | None = None, model_id: str = "tiny", engine: str = "process"
) -> Iterator[str]:
    """Serve ``model`` on 127.0.0.1 (a free port) in a thread; yields the base URL.

    ``engine``: see :data:`ENGINES`.
    """
    limits = limits or Limits()
    app = create_app(model, model_id, limits, make_engine(model, limits, engine))
    with serving(app, limits) as url:
        yield url


@contextlib.contextmanager
def serving(app: Starlette, limits: Limits) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    server = make_server(app, limits, shutdown_timeout=5, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
