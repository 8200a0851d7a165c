"""float16, int8 and external-data exports in the standard clients.

The same clients as tests/test_clients.py (Optimum, onnxruntime-genai, transformers.js)
load a float16 export, an int8 export with its weights as external data and a float32
export with external data, each with its standard call, and must generate the tokens
mlxgpt-ort generates from the same folder (greedy, the folder's defaults). A missing
client fails the test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import MODEL_FILES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_clients imports bench_infer from there
_spec = importlib.util.spec_from_file_location("bench_clients", ROOT / "scripts/bench_clients.py")
clients = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clients)

PROMPTS = ["First Citizen:\n", "All: speak"]
NEW = 12  # prompt + NEW fits the trained model's 32-token window (genai stops there)
# case: (precision, export options); external_data_threshold=0 puts the weights in
# onnx/<file>_data as any model above 2 GiB is written
CASES = {
    "float16": ("float16", {"dtype": "float16"}),
    "int8-external": ("int8", {"quantize": "int8", "external_data_threshold": 0}),
    "float32-external": ("float32", {"external_data_threshold": 0}),
}
JS_DTYPES = {"float32": "fp32", "float16": "fp16", "int8": "q8"}


@pytest.fixture(scope="module")
def folders(trained_ckpt: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision-clients")
    return {
        case: export_checkpoint(trained_ckpt, root / case, quiet=True, **options)
        for case, (_, options) in CASES.items()
    }


@pytest.fixture(scope="module")
def expected(folders) -> dict[str, list[list[int]]]:
    out = {}
    for case, folder in folders.items():
        ort = clients.MlxgptOrt(folder)
        out[case] = [ort.generate(p, NEW) for p in PROMPTS]
        assert all(len(ids) == NEW for ids in out[case])  # a char model: full length
    return out


def test_the_folders_hold_what_the_clients_look_for(folders):
    for case, folder in folders.items():
        precision, options = CASES[case]
        name = Path(MODEL_FILES[precision]).name
        files = sorted(p.name for p in (folder / "onnx").iterdir())
        external = "external_data_threshold" in options
        assert files == ([name, f"{name}_data"] if external else [name])


@pytest.mark.parametrize("case", CASES)
def test_optimum(case, folders, expected):
    """``ORTModelForCausalLM.from_pretrained(folder, file_name=...)``: same tokens."""
    name = Path(MODEL_FILES[CASES[case][0]]).name
    client = clients.Optimum(folders[case], file_name=name)
    assert [client.generate(p, NEW) for p in PROMPTS] == expected[case]


@pytest.mark.parametrize("case", CASES)
def test_genai(case, folders, expected):
    """``og.Model(folder)`` (genai_config.json names the file): same tokens."""
    client = clients.Genai(folders[case])
    assert [client.generate(p, NEW) for p in PROMPTS] == expected[case]


@pytest.fixture(scope="module")
def transformers_js(folders):
    """Each folder without a dtype option (config.json names it) and with the explicit one."""
    node = clients.TransformersJs()
    try:
        results = {}
        for case, folder in folders.items():
            results[case, "config"] = node.run(folder, PROMPTS, NEW)
            dtype = JS_DTYPES[CASES[case][0]]
            results[case, dtype] = node.run(folder, PROMPTS, NEW, dtype=dtype)
    finally:
        node.close()
    return results


@pytest.mark.parametrize("case", CASES)
def test_transformers_js(case, transformers_js, expected):
    """``from_pretrained(name)`` and ``from_pretrained(name, { dtype })``: same tokens."""
    for how in ("config", JS_DTYPES[CASES[case][0]]):
        assert transformers_js[case, how]["generated"] == expected[case], how
