"""The engine in a child process (``mlxgpt-ort serve``'s): what happens when it fails."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from test_server_support import char_export, make_engine, serving

from mlxgpt_export.batching import Limits
from mlxgpt_export.engine_process import EngineStopped, ProcessEngine
from mlxgpt_export.errors import InputError
from mlxgpt_export.runtime import OnnxGPT
from mlxgpt_export.server import create_app


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> OnnxGPT:
    return OnnxGPT.load(char_export(tmp_path_factory.mktemp("process") / "tiny"))


def test_a_dead_engine_process_ends_requests_with_an_error_and_says_so(model: OnnxGPT):
    limits = Limits(max_tokens=100_000)
    engine = make_engine(model, limits, "process")
    app = create_app(model, "tiny", limits, engine)
    body = {"prompt": "ab", "max_tokens": 100_000, "temperature": 1.0, "seed": 1, "stream": True}
    with serving(app, limits) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["status"] == "ok"
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = (line for line in response.iter_lines() if line)
            assert "choices" in json.loads(next(lines)[6:])  # streaming
            engine._process.kill()  # as the out-of-memory killer would
            rest = list(lines)
        event = json.loads(rest[-1][6:])  # the stream ends with an error, not [DONE]
        assert event["error"]["type"] == "server_error"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "restart the server" in health.json()["error"]
        refused = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert refused.status_code == 503 and "retry-after" not in refused.headers
        assert refused.json()["error"]["code"] == "engine_stopped"


def test_an_engine_process_that_cannot_load_the_model_is_reported(model: OnnxGPT, tmp_path: Path):
    engine = ProcessEngine(model, max_batch=2, max_queue=0, folder=tmp_path / "gone")

    async def start() -> None:
        engine.start()

    with pytest.raises(EngineStopped, match="could not load the model: .*gone"):
        asyncio.run(start())


def test_the_serving_process_frees_its_session_and_keeps_what_requests_need(
    model: OnnxGPT, monkeypatch
):
    """``serve`` checks the folder in its own process, then leaves the weights to the
    engine process: in memory once."""
    from mlxgpt_export import server as server_module

    folder = model.folder
    seen = {}

    class Recorder:  # instead of uvicorn: look at the app serve() built, serve nothing
        def __init__(self, app, *args, **kwargs):
            seen["service"] = app.state.service

        def run(self, sockets) -> None:
            pass

    monkeypatch.setattr(server_module, "make_server", Recorder)
    assert server_module.serve(folder, port=0) == 0
    service = seen["service"]
    assert isinstance(service.engine, ProcessEngine)
    assert service.model.session is None and service.model.config == model.config
    assert service.tokenizer.encode("ab") == model.tokenizer.encode("ab")
    assert service.model.default_settings() == model.default_settings()
    with pytest.raises(InputError, match="released"):
        service.model.forward([[1, 2]])


def test_serve_says_so_in_one_line_when_the_engine_process_cannot_start(
    model: OnnxGPT, monkeypatch, capsys
):
    """The engine process starts before the server listens for requests: a failure there is
    an ``error:`` line and exit status 2, not a failed application startup."""
    from mlxgpt_export.cli import main

    def fail(self) -> None:
        raise EngineStopped("the engine process could not load the model: out of memory")

    monkeypatch.setattr(ProcessEngine, "launch", fail)
    assert main(["serve", str(model.folder), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the engine process could not load the model: out of memory")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
