"""Shared fixtures: a tiny corpus, a briefly trained tiny checkpoint (built once), and its
export in both attention forms loaded in mlxgpt-ort (once per test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlxgpt  # noqa: F401  (loads the fast BLAS before MLX)

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def tiny_train_config(data: Path, out_dir: Path, **overrides):
    """A training config small enough to run in a second or two on a CPU."""
    from mlxgpt.config import load_train_config

    values = {
        "data": str(data),
        "out_dir": str(out_dir),
        "batch_size": 4,
        "max_iters": 40,
        "warmup_iters": 5,
        "eval_interval": 20,
        "eval_iters": 2,
        "ckpt_interval": 20,
        "learning_rate": 3e-3,
        "sample_tokens": 0,
        "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    }
    for key, value in overrides.items():
        if key == "model":
            values["model"] = {**values["model"], **value}
        else:
            values[key] = value
    return load_train_config(None, values)


@pytest.fixture(scope="session")
def trained_ckpt(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained character-level checkpoint directory (out_dir/ckpt)."""
    from mlxgpt.train import train

    out = tmp_path_factory.mktemp("trained")
    result = train(tiny_train_config(corpus_file, out), progress=False, quiet=True)
    return result.ckpt


@pytest.fixture(scope="module", params=["portable", "fused"])
def exported(request, trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained checkpoint exported with each attention form."""
    from mlxgpt_export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("exported") / request.param
    return export_checkpoint(trained_ckpt, out, attention=request.param, quiet=True)


@pytest.fixture(scope="module")
def ort(exported: Path):
    """:func:`exported` loaded in mlxgpt-ort (``OnnxGPT``)."""
    from mlxgpt_export.runtime import OnnxGPT

    return OnnxGPT.load(exported)
