"""Bad input gets a 4xx error in OpenAI's shape, a full server gets 503, and it keeps serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from test_server_support import char_export, running_server

from mlxgpt_export.batching import Limits
from mlxgpt_export.runtime import OnnxGPT

LIMITS = Limits(max_tokens=500, max_prompt_tokens=100, max_prompts=3, max_body_bytes=4096)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> OnnxGPT:
    return OnnxGPT.load(char_export(tmp_path_factory.mktemp("errors") / "tiny"))


@pytest.fixture(scope="module")
def url(model: OnnxGPT):
    with running_server(model, LIMITS) as base:
        yield base


def check_error(response: httpx.Response, status: int, param: str | None) -> str:
    """The response is OpenAI's error object with this status and param; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


def complete(url: str, body, **kwargs) -> httpx.Response:
    if not isinstance(body, dict):  # raw bytes, or chunks of them
        return httpx.post(f"{url}/v1/completions", content=body, timeout=30, **kwargs)
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30, **kwargs)


BAD = {
    "malformed JSON": (b'{"prompt": "a",', None, "not valid JSON"),
    "NaN": (b'{"prompt": "a", "temperature": NaN}', None, "NaN is not valid JSON"),
    "not UTF-8": (b'{"prompt": "\xff"}', None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, "must be a JSON object"),
    "no prompt": ({"max_tokens": 3}, "prompt", "'prompt' is required"),
    "prompt a number": ({"prompt": 5}, "prompt", "string or a list of strings"),
    "prompt list with a number": ({"prompt": ["a", 3]}, "prompt", "string or a list"),
    "empty prompt list": ({"prompt": []}, "prompt", "empty list"),
    "too many prompts": ({"prompt": ["a"] * 4}, "prompt", "at most 3"),
    "prompt too long": ({"prompt": "a" * 101}, "prompt", "at most 100"),
    "unknown character": ({"prompt": "café"}, "prompt", "'é'"),
    "max_tokens a string": ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "valid integer"),
    "max_tokens a bool": ({"prompt": "a", "max_tokens": True}, "max_tokens", "valid integer"),
    "max_tokens < 0": ({"prompt": "a", "max_tokens": -1}, "max_tokens", "greater than"),
    "max_tokens over cap": ({"prompt": "a", "max_tokens": 501}, "max_tokens", "limit of 500"),
    "temperature < 0": ({"prompt": "a", "temperature": -0.1}, "temperature", "greater than"),
    "temperature text": ({"prompt": "a", "temperature": "hot"}, "temperature", "valid number"),
    "top_p 0": ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
    "top_p > 1": ({"prompt": "a", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    "top_k < 0": ({"prompt": "a", "top_k": -2}, "top_k", "greater than"),
    "seed < 0": ({"prompt": "a", "seed": -1}, "seed", "greater than"),
    "seed a float": ({"prompt": "a", "seed": 1.5}, "seed", "valid integer"),
    "n 2": ({"prompt": "a", "n": 2}, "n", "only n=1"),
    "stream a string": ({"prompt": "a", "stream": "yes"}, "stream", "valid boolean"),
    "empty stop": ({"prompt": "a", "stop": ["", "x"]}, "stop", "non-empty"),
    "five stops": ({"prompt": "a", "stop": list("abcde")}, "stop", "up to 4"),
    "stop a number": ({"prompt": "a", "stop": 3}, "stop", "string or a list"),
    "typo field": ({"prompt": "a", "max_token": 5}, "max_token", "unknown field"),
    "echo": ({"prompt": "a", "echo": True}, "echo", "not supported"),
    "logprobs": ({"prompt": "a", "logprobs": 2}, "logprobs", "not supported"),
    "penalty": ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    "stream_options typo": (
        {"prompt": "a", "stream": True, "stream_options": {"usage": True}},
        "stream_options",
        "unknown field",
    ),
}


@pytest.mark.parametrize("body,param,message", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_400_and_the_server_keeps_serving(url, body, param, message):
    assert message in check_error(complete(url, body), 400, param)
    ok = complete(url, {"prompt": "ab", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_openai_fields_at_their_neutral_values_are_accepted(url):
    body = {
        "model": "tiny", "prompt": "a", "max_tokens": 2, "n": 1, "echo": False,
        "logprobs": None, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logit_bias": {}, "suffix": None, "user": "someone", "stop": None,
    }  # fmt: skip
    assert complete(url, body).status_code == 200


def test_unknown_model_route_and_method(url):
    error = complete(url, {"model": "gpt-4", "prompt": "a"})
    assert "'tiny'" in check_error(error, 404, "model")
    assert error.json()["error"]["code"] == "model_not_found"
    check_error(httpx.get(f"{url}/v1/nothing"), 404, None)
    check_error(httpx.get(f"{url}/v1/completions"), 405, None)
    check_error(httpx.get(f"{url}/v1/models/other"), 404, "model")


def test_body_over_the_size_limit_gets_413(url):
    big = json.dumps({"prompt": "a" * 5000}).encode()
    assert "4096 bytes" in check_error(complete(url, big), 413, None)

    def chunks():  # no Content-Length: the limit applies while reading
        yield big[:2000]
        yield big[2000:]

    check_error(complete(url, chunks()), 413, None)
    assert complete(url, {"prompt": "a", "max_tokens": 1}).status_code == 200


def wait_for_load(url: str, running: int, waiting: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = httpx.get(f"{url}/health").json()
        if (load["running"], load["waiting"]) == (running, waiting):
            return load
        assert time.monotonic() < deadline, f"load stayed {load}"
        time.sleep(0.02)


LONG = {"prompt": "ab", "max_tokens": 100_000, "temperature": 1.0, "seed": 1, "stream": True}


def test_full_queue_gets_503_with_retry_after_and_disconnects_free_slots(model: OnnxGPT):
    limits = Limits(max_batch=1, max_queue=1, max_tokens=100_000)
    with running_server(model, limits) as url, httpx.Client(base_url=url, timeout=30) as client:
        # (keep each line iterator: dropping one makes httpx close its connection)
        with client.stream("POST", "/v1/completions", json=LONG) as first:
            first_lines = first.iter_lines()
            assert next(first_lines).startswith("data: ")  # running
            with client.stream("POST", "/v1/completions", json=LONG) as second:
                second_lines = second.iter_lines()
                wait_for_load(url, 1, 1)  # queued
                refused = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                error = refused.json()["error"]
                assert error["type"] == "server_error" and "busy" in error["message"]
                assert set(error) == {"message", "type", "param", "code"}
                first.close()  # the client goes away mid-stream
                wait_for_load(url, 1, 0)  # its slot went to the queued request
                assert next(second_lines).startswith("data: ")
        wait_for_load(url, 0, 0)
        done = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert done.status_code == 200


def test_a_non_streaming_client_that_gives_up_frees_its_slot(model: OnnxGPT):
    limits = Limits(max_batch=1, max_queue=0, max_tokens=100_000)
    with running_server(model, limits) as url:
        body = {**LONG, "stream": False}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
        wait_for_load(url, 0, 0)
        assert complete(url, {"prompt": "a", "max_tokens": 1}).status_code == 200


def test_cli_serve_errors(tmp_path: Path, capsys):
    from mlxgpt_export.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--max-batch", "0"])
    assert "--max-batch" in capsys.readouterr().err
