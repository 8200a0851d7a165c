"""The OpenAI-compatible server, through the real ``openai`` client: same text as the CLI."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from test_server_support import ENGINES, bpe_export, char_export, running_server

from mlxgpt.sampling import SamplingParams
from mlxgpt_export.cli import main as ort_main
from mlxgpt_export.runtime import OnnxGPT

LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 2  # > 32 tokens: cropped


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return char_export(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="module")
def model(folder: Path) -> OnnxGPT:
    return OnnxGPT.load(folder)


@pytest.fixture(scope="module", params=ENGINES)
def url(model: OnnxGPT, request):
    with running_server(model, engine=request.param) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)


def cli_text(folder: Path, capsys, prompt: str, *flags: str) -> str:
    """The continuation ``mlxgpt-ort generate`` prints for ``prompt``."""
    assert ort_main(["generate", str(folder), "--prompt", prompt, *flags]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(prompt) and printed.endswith("\n")
    return printed[len(prompt) : -1]


def alone(model: OnnxGPT, prompt: str, max_tokens: int, params: SamplingParams) -> str:
    return "".join(model.generate(prompt, max_tokens, params))


CASES = [  # request fields; the CLI gets the same values as flags (see flags())
    {"max_tokens": 40},
    {"max_tokens": 50, "temperature": 0.8, "seed": 1},
    {"max_tokens": 70, "temperature": 1.0, "seed": 2, "top_k": 5},
    {"max_tokens": 30, "temperature": 0.9, "top_p": 0.8, "seed": 3},
]


def flags(fields: dict) -> list[str]:
    """``{"top_k": 5}`` -> ``["--top-k", "5"]``."""
    pairs = [(f"--{key.replace('_', '-')}", str(value)) for key, value in fields.items()]
    return [text for pair in pairs for text in pair]


def create(client: OpenAI, prompt, fields: dict, **extra):
    """``client.completions.create`` with ``top_k`` sent as the extension it is."""
    fields = dict(fields)
    top_k = fields.pop("top_k", None)
    return client.completions.create(
        model="tiny",
        prompt=prompt,
        extra_body={"top_k": top_k} if top_k is not None else None,
        **fields,
        **extra,
    )


@pytest.mark.parametrize("fields", CASES, ids=["greedy", "temp", "topk", "topp"])
@pytest.mark.parametrize("prompt", ["ROMEO", "", LONG_PROMPT], ids=["short", "empty", "long"])
def test_completion_equals_cli_generate(client, folder, capsys, prompt, fields):
    expected = cli_text(folder, capsys, prompt, *flags(fields))
    result = create(client, prompt, fields)
    assert result.object == "text_completion" and result.model == "tiny"
    (choice,) = result.choices
    assert choice.text == expected and choice.index == 0
    assert choice.finish_reason == "length"  # character models have no end-of-text token
    assert result.usage.completion_tokens == fields["max_tokens"]
    assert result.usage.prompt_tokens == min(max(len(prompt), 1), 32)  # cropped to the window
    assert result.usage.total_tokens == result.usage.prompt_tokens + fields["max_tokens"]


@pytest.mark.parametrize("fields", CASES[1:3], ids=["temp", "topk"])
def test_streamed_completion_equals_cli_generate(client, folder, capsys, fields):
    expected = cli_text(folder, capsys, "Be or not", *flags(fields))
    chunks = list(create(client, "Be or not", fields, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_and_optional_usage(url: str, model: OnnxGPT):
    body = {"prompt": "Hi", "max_tokens": 12, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14,
    }  # fmt: skip
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == alone(model, "Hi", 12, SamplingParams())


def test_omitted_settings_come_from_generation_config(folder: Path, tmp_path: Path, capsys):
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    settings = {"do_sample": True, "temperature": 0.7, "top_k": 6, "top_p": 0.9}
    settings["max_new_tokens"] = 23
    (custom / "generation_config.json").write_text(json.dumps(settings))
    expected = cli_text(custom, capsys, "hello", "--seed", "5")
    with running_server(OnnxGPT.load(custom)) as base:
        response = httpx.post(f"{base}/v1/completions", json={"prompt": "hello", "seed": 5})
    assert response.status_code == 200
    (choice,) = response.json()["choices"]
    assert choice["text"] == expected and response.json()["usage"]["completion_tokens"] == 23


def test_a_list_of_prompts_gives_one_choice_each(client, model):
    prompts = ["ROMEO", "hello world", "", LONG_PROMPT]
    params = SamplingParams(temperature=0.8, seed=9)
    result = client.completions.create(
        model="tiny", prompt=prompts, max_tokens=45, temperature=0.8, seed=9
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for prompt, choice in zip(prompts, result.choices, strict=True):
        assert choice.text == alone(model, prompt, 45, params)
    assert result.usage.completion_tokens == 4 * 45
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(
        model="tiny", prompt=prompts, max_tokens=45, temperature=0.8, seed=9, stream=True
    ):
        (choice,) = chunk.choices  # one choice per chunk
        streamed[choice.index] += choice.text
    assert streamed == [c.text for c in result.choices]


def test_stop_sequences_cut_the_text(client, model):
    params = SamplingParams(temperature=1.0, seed=4)
    full = alone(model, "ROMEO", 60, params)
    stop = full[20:23]  # appears at 20 or earlier
    cut = full[: full.index(stop)]
    for stream in (False, True):
        result = client.completions.create(
            model="tiny", prompt="ROMEO", max_tokens=60, temperature=1.0, seed=4,
            stop=[stop, "never seen: 9"], stream=stream,
        )  # fmt: skip
        chunks = list(result) if stream else [result]
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"
    result = client.completions.create(
        model="tiny", prompt="ROMEO", max_tokens=60, temperature=1.0, seed=4, stop="9"
    )
    assert result.choices[0].text == full and result.choices[0].finish_reason == "length"


def test_sixteen_concurrent_requests_each_get_their_text_alone(client, model, url):
    prompts = ["ROMEO", "hello", "", LONG_PROMPT, "a b c", "JOHN said", "xyz", "Q"] * 2
    jobs = [
        (prompt, 10 + 7 * i, SamplingParams(temperature=0.3 * (i % 4), top_k=i % 3 or None, seed=i))
        for i, prompt in enumerate(prompts)
    ]

    def run(job):
        prompt, max_tokens, p = job
        extra = {"top_k": p.top_k} if p.top_k else None
        result = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=p.temperature,
            seed=p.seed, extra_body=extra, stream=max_tokens % 2 == 0,
        )  # fmt: skip
        if max_tokens % 2 == 0:
            return "".join(chunk.choices[0].text for chunk in result)
        return result.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(run, jobs))
    for (prompt, max_tokens, p), text in zip(jobs, texts, strict=True):
        assert text == alone(model, prompt, max_tokens, p)
    load = httpx.get(f"{url}/health").json()
    assert load["running"] == 0 and load["waiting"] == 0
    assert load["peak_batch"] > 1  # the requests were really decoded together


def test_end_of_text_token_finishes_with_stop(tmp_path: Path, monkeypatch):
    model = OnnxGPT.load(bpe_export(tmp_path / "bpe"))
    assert model.eos_id is not None
    prompt, params = "私は学校", SamplingParams(temperature=1.0, seed=3)
    free = list(model.generate_ids(model.tokenizer.encode(prompt), 40, params))
    stop = free[10]
    monkeypatch.setattr(OnnxGPT, "eos_id", property(lambda self: stop))  # a token it will draw
    expected = alone(model, prompt, 40, params)
    # the patched property exists in this process only: decode in a thread of it
    with running_server(model, model_id="bpe", engine="thread") as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        result = client.completions.create(
            model="bpe", prompt=prompt, max_tokens=40, temperature=1.0, seed=3
        )
        emoji = client.completions.create(model="bpe", prompt="🙂 fox", max_tokens=5)
    assert result.choices[0].text == expected and result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == free.index(stop)
    assert emoji.choices[0].text == alone(model, "🙂 fox", 5, SamplingParams())


def test_models_and_health(client, url):
    (entry,) = client.models.list().data
    assert entry.id == "tiny" and entry.owned_by == "mlxgpt"
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16 and health["max_queue"] == 64
