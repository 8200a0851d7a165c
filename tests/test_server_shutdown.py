"""``mlxgpt-ort serve`` as a process: no MLX/onnx imports, graceful SIGTERM, exit status 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from test_server_support import char_export

from mlxgpt.sampling import SamplingParams
from mlxgpt_export.runtime import OnnxGPT

REPO = Path(__file__).resolve().parents[1]

# Run the CLI in a process where the training/export-only packages cannot be imported.
BLOCKED = ("mlx", "onnx", "safetensors", "tqdm", "matplotlib")
LAUNCHER = f"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from mlxgpt_export.cli import main
code = main(sys.argv[1:])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r}))
print("blocked modules loaded:", loaded, flush=True)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return char_export(tmp_path_factory.mktemp("shutdown") / "tiny")


class ServerProcess:
    """``mlxgpt-ort serve FOLDER --port 0 ...`` in a subprocess; knows its URL."""

    def __init__(self, folder: Path, *flags: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(LAUNCHER), "serve", str(folder), "--port", "0",
             "--log-level", "warning", *flags],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own process group, for signals to the whole group
        )  # fmt: skip
        line = self.proc.stdout.readline()
        assert line.startswith("serving "), line + self.proc.stderr.read()
        self.url = line.split(" on ")[1].split()[0].removesuffix("/v1")
        deadline = time.monotonic() + 30
        while True:  # the socket listens before uvicorn has started the app
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        # its engine process (and multiprocessing's resource tracker): gone when it is
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        assert any("spawn_main" in " ".join(c.cmdline()) for c in self.children)

    def stop(self, timeout: float = 60) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit status and output of a server already told to stop (a second SIGTERM
        arriving after the graceful shutdown would kill it by signal); its child processes
        must have ended with it."""
        out, err = self.proc.communicate(timeout=timeout)
        _, alive = psutil.wait_procs(self.children, timeout=10)
        assert not alive, f"left running: {alive}"
        return self.proc.returncode, out, err


def stream_lines(url: str, body: dict, lines: list[str], started: threading.Event) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except httpx.HTTPError as err:  # the server cut the connection
        lines.append(f"cut: {type(err).__name__}")
    started.set()


@pytest.mark.parametrize(
    ("signum", "to_group", "status"),
    [(signal.SIGTERM, False, 0), (signal.SIGTERM, True, 0), (signal.SIGINT, True, 130)],
    ids=["sigterm-to-server", "sigterm-to-process-group", "ctrl-c-to-process-group"],
)
def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(
    folder: Path, signum: int, to_group: bool, status: int
):
    """Also when every process of the server gets the signal (a service manager stopping
    the service, Ctrl-C in a terminal): the engine process keeps decoding until told.
    Ctrl-C shuts down the same way and exits with 130."""
    server = ServerProcess(folder, "--max-tokens-cap", "20000", "--shutdown-timeout", "60")
    body = {"prompt": "ab", "max_tokens": 1000, "temperature": 1.0, "seed": 2, "stream": True}
    lines: list[str] = []
    started = threading.Event()
    client = threading.Thread(target=stream_lines, args=(server.url, body, lines, started))
    client.start()
    assert started.wait(30)
    assert httpx.get(f"{server.url}/health").json()["running"] == 1  # in flight
    if to_group:
        os.killpg(server.proc.pid, signum)
    else:
        server.proc.send_signal(signum)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no longer accepting connections
        httpx.get(f"{server.url}/health", timeout=5)
    client.join(60)
    code, out, err = server.wait()
    assert code == status, err
    assert "blocked modules loaded: []" in out
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    model = OnnxGPT.load(folder)
    assert text == "".join(model.generate("ab", 1000, SamplingParams(1.0, seed=2)))


def test_sigterm_cancels_what_cannot_finish_in_time_and_exits_0(folder: Path):
    server = ServerProcess(folder, "--max-tokens-cap", "10000000", "--shutdown-timeout", "1")
    body = {"prompt": "ab", "max_tokens": 10_000_000, "stream": True}
    lines: list[str] = []
    started = threading.Event()
    client = threading.Thread(target=stream_lines, args=(server.url, body, lines, started))
    client.start()
    assert started.wait(30)
    began = time.monotonic()
    code, out, err = server.stop(timeout=30)
    client.join(30)
    assert code == 0, err
    assert time.monotonic() - began < 20
    assert lines[-1] != "data: [DONE]"  # cut short, not passed off as complete


def test_serve_reports_a_port_in_use(folder: Path):
    server = ServerProcess(folder)
    try:
        port = server.url.rsplit(":", 1)[1]
        result = subprocess.run(
            [sys.executable, "-m", "mlxgpt_export", "serve", str(folder), "--port", port],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
        assert "Traceback" not in result.stderr
    finally:
        assert server.stop()[0] == 0


def test_the_server_runs_on_uvloop_and_httptools(folder: Path):
    """uvicorn picks its fast event loop and HTTP parser only if they are installed; they
    are dependencies because each token's SSE event costs the event loop less with them."""
    from mlxgpt_export.batching import Limits
    from mlxgpt_export.server import create_app, make_server

    app = create_app(OnnxGPT.load(folder), "m")
    config = make_server(app, Limits(), 1.0, "warning").config
    config.load()
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"
    if sys.platform != "win32":  # uvloop has no Windows build
        loop = config.get_loop_factory()()
        try:
            assert type(loop).__module__.split(".")[0] == "uvloop"
        finally:
            loop.close()


def test_the_engine_process_ends_with_a_killed_server(folder: Path):
    """SIGKILL gives the server no chance to stop its engine: the engine sees its pipe
    close and exits by itself."""
    server = ServerProcess(folder)
    server.proc.kill()
    server.proc.communicate(timeout=30)
    _, alive = psutil.wait_procs(server.children, timeout=20)
    assert not alive, f"left running: {alive}"
