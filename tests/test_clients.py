"""The export folder in the standard clients: Optimum, onnxruntime-genai, transformers.js.

Each client loads the folder exactly as ``mlxgpt export`` writes it, with its own standard
call and the folder's own defaults (greedy), and must produce the same tokens as mlxgpt-ort:
for a char-level and a byte-level BPE model, both attention forms, 40 greedy tokens per
prompt and a batch of two prompts of different lengths. The clients are test dependencies
(``pip install -e ".[dev]"``, ``npm ci --ignore-scripts`` in tests/js): a missing one fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_train_config
from test_export_support import write_random_checkpoint

from mlxgpt.config import GPTConfig
from mlxgpt.tokenizer import Tokenizer
from mlxgpt_export.exporter import export_checkpoint, genai_stop_id

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_clients imports bench_infer from there
_spec = importlib.util.spec_from_file_location("bench_clients", ROOT / "scripts/bench_clients.py")
clients = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clients)

PROMPTS = ["First Citizen:\n", "All: speak"]  # different lengths: the batch is padded
NEW = 40  # prompt + NEW fits the 64-token window (genai cannot go past it)
KINDS = ("char", "bpe")
CASES = [(kind, form) for kind in KINDS for form in clients.FORMS]


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def folders(corpus_file: Path, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """A briefly trained char and BPE model (window 64), each exported in both forms."""
    from mlxgpt.train import train

    root = tmp_path_factory.mktemp("clients")
    out = {}
    for kind in KINDS:
        extra = {"tokenizer": "bpe", "bpe_vocab_size": 300} if kind == "bpe" else {}
        config = tiny_train_config(
            corpus_file, root / kind, max_iters=100, model={"block_size": 64}, **extra
        )
        ckpt = train(config, progress=False, quiet=True).ckpt
        for form in clients.FORMS:
            out[kind, form] = export_checkpoint(ckpt, root / f"{kind}-{form}", form, quiet=True)
    return out


@pytest.fixture(scope="module")
def expected(folders) -> dict[tuple[str, str], dict]:
    """What mlxgpt-ort generates: each prompt alone, the batch, and the decoded texts."""
    out = {}
    for case, folder in folders.items():
        ort = clients.MlxgptOrt(folder)
        single = [ort.generate(p, NEW) for p in PROMPTS]
        out[case] = {
            "tokenizer": ort.model.tokenizer,
            "encoded": [ort.encode(p) for p in PROMPTS],
            "single": single,
            "texts": [ort.model.tokenizer.decode(ids) for ids in single],
            "batch": ort.generate_batch(PROMPTS, NEW),
        }
    return out


def check_generation(
    kind: str, want: dict, single: list[list[int]], batch: list[list[int]] | None = None
) -> None:
    """A client's tokens equal mlxgpt-ort's (up to the end token, where it has one)."""
    tokenizer: Tokenizer = want["tokenizer"]
    got = [clients.until(ids, tokenizer.eos_id) for ids in single]
    assert got == want["single"]
    if kind == "char":  # no end token: the full length, newlines included
        assert all(len(ids) == NEW for ids in got)
        assert any(tokenizer.start_id in ids for ids in got)  # it went past a newline
    if batch is not None:
        rows = [clients.until(ids, tokenizer.eos_id) for ids in batch]
        assert rows == want["batch"] == want["single"]


def test_mlxgpt_ort_batch_equals_each_prompt_alone(expected):
    for want in expected.values():
        assert want["batch"] == want["single"]


# -- Hugging Face Optimum -------------------------------------------------------------------
@pytest.fixture(scope="module", params=CASES, ids=case_id)
def optimum(request, folders):
    return request.param, clients.Optimum(folders[request.param])


def test_optimum(optimum, expected):
    """``ORTModelForCausalLM.from_pretrained(folder)`` + ``AutoTokenizer``: same tokens, text."""
    case, client = optimum
    kind, _ = case
    want = expected[case]
    assert [client.encode(p) for p in PROMPTS] == want["encoded"]
    single = [client.generate(p, NEW) for p in PROMPTS]
    assert [client.decode(ids) for ids in want["single"]] == want["texts"]  # newlines kept
    if kind == "char":  # a char model declares no pad token (see exporter): name one to batch
        client.tokenizer.pad_token = "\n"
    check_generation(kind, want, single, client.generate_batch(PROMPTS, NEW))


def test_optimum_reads_the_special_tokens(optimum, expected):
    case, client = optimum
    tokenizer: Tokenizer = expected[case]["tokenizer"]
    generation = client.model.generation_config
    assert generation.bos_token_id == tokenizer.start_id
    assert generation.eos_token_id == tokenizer.eos_id  # None for a char model
    assert generation.do_sample is False and generation.max_new_tokens == 200
    assert client.tokenizer.padding_side == "left"


# -- onnxruntime-genai ----------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_genai(case, folders, expected):
    """``og.Model(folder)``, ``og.Tokenizer``, ``og.Generator``: same tokens and text."""
    client = clients.Genai(folders[case])
    want = expected[case]
    assert [client.encode(p) for p in PROMPTS] == want["encoded"]
    assert [client.decode(ids) for ids in want["single"]] == want["texts"]
    single = [client.generate(p, NEW) for p in PROMPTS]
    if case[0] == "char":  # genai needs an end token: never the newline, and not drawn here
        stop = genai_stop_id(want["tokenizer"])
        assert stop != want["tokenizer"].start_id
        assert stop not in [t for ids in want["single"] for t in ids]
    check_generation(case[0], want, single, client.generate_batch(PROMPTS, NEW))


def test_genai_char_tokenizer_reads_any_character(tmp_path: Path, folders):
    """Non-ASCII characters, spaces, tabs and CR LF: genai's tokenizer gives mlxgpt's ids."""
    text = "a b\tc\r\nXé€ 😀ñ\u0301 字!"
    tokenizer = Tokenizer.train_char([text])
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=1)
    ckpt = write_random_checkpoint(tmp_path / "ckpt", dataclasses.replace(config, n_embd=8))
    tokenizer.save(ckpt / "tokenizer.json")
    client = clients.Genai(export_checkpoint(ckpt, tmp_path / "out", quiet=True))
    assert client.encode(text) == tokenizer.encode(text)
    assert client.decode(tokenizer.encode(text)) == text


# -- transformers.js (Node) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def transformers_js(folders, expected):
    """One Node process runs every case: each prompt alone and the left-padded batch."""
    node = clients.TransformersJs()
    try:
        results = {}
        for case, folder in folders.items():
            pad = expected[case]["tokenizer"].start_id if case[0] == "char" else None
            results[case] = node.run(folder, PROMPTS, NEW, batch=True, pad_token_id=pad)
    finally:
        node.close()
    return results


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_transformers_js(case, transformers_js, expected):
    """``AutoModelForCausalLM.from_pretrained`` in Node, remote models off: same tokens, text."""
    result, want = transformers_js[case], expected[case]
    assert result["encoded"] == want["encoded"]
    check_generation(case[0], want, result["generated"], result["batch"])
    assert result["texts"] == want["texts"]


def test_bench_clients_smoke(tmp_path: Path, capsys):
    """scripts/bench_clients.py on a tiny random model: every client and form gets a figure."""
    out = tmp_path / "bench.json"
    rows = clients.main(["--tokens", "6", "--rounds", "1", "--json", str(out)])
    assert {(r["client"], r["attention"]) for r in rows} == {
        (c, f) for c in ("mlxgpt-ort", "optimum", "genai", "transformers.js") for f in clients.FORMS
    }
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert [r["ratio"] for r in rows if r["client"] == "mlxgpt-ort"] == [1.0, 1.0]
    assert json.loads(out.read_text())["rows"] == rows
    assert "| transformers.js | fused |" in capsys.readouterr().out
