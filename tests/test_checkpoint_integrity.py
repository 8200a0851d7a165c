"""Hand-edited or damaged checkpoints: a clear error naming the problem, never a traceback
and never a silently wrong model."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlxgpt.checkpoint import DIGEST_KEY, CheckpointError
from mlxgpt.cli import main
from mlxgpt.model_io import load_model
from mlxgpt_export.exporter import export_checkpoint


@pytest.fixture
def run(tmp_path, trained_ckpt):
    """A copy of the trained run's out_dir (its data cache is rebuilt on resume)."""
    out = tmp_path / "run"
    (out / "ckpt").parent.mkdir()
    shutil.copytree(trained_ckpt, out / "ckpt")
    return out


def resume(capsys, out, corpus_file):
    code = main(
        ["train", "--resume", str(out), "--no-progress", f"data={corpus_file}", "max_iters=41"]
    )
    return code, capsys.readouterr().err


@pytest.mark.parametrize("key", ["step", "data_rng"])
def test_state_json_missing_a_key(capsys, run, corpus_file, key):
    path = run / "ckpt" / "state.json"
    state = json.loads(path.read_text())
    del state[key]
    path.write_text(json.dumps(state))
    code, err = resume(capsys, run, corpus_file)
    assert code == 2 and err.startswith("error: ") and key in err and "Traceback" not in err


def test_state_json_with_a_broken_sampler_state(capsys, run, corpus_file):
    path = run / "ckpt" / "state.json"
    state = json.loads(path.read_text())
    state["data_rng"] = {"bit_generator": "PCG64", "state": "oops"}
    path.write_text(json.dumps(state))
    code, err = resume(capsys, run, corpus_file)
    assert code == 2 and "data_rng" in err


@pytest.mark.parametrize("damage", ["renamed", "missing", "reshaped"])
def test_optimizer_state_that_does_not_fit(capsys, run, corpus_file, damage):
    path = run / "ckpt" / "optimizer.safetensors"
    flat = dict(mx.load(str(path)))
    name = next(k for k in flat if k.endswith("wte.weight.m"))
    if damage == "renamed":
        flat[name.replace("wte", "wtf")] = flat.pop(name)
    elif damage == "missing":
        del flat[name]
    else:
        flat[name] = mx.zeros((3, 3))
    mx.save_safetensors(str(path), flat)
    code, err = resume(capsys, run, corpus_file)
    assert code == 2 and "optimizer.safetensors" in err and "Traceback" not in err


def test_config_changed_by_hand_is_caught_by_the_digest(capsys, run, tmp_path):
    """Same weight shapes, different n_head: without the digest this loads, generates and
    exports a different (wrong) model."""
    path = run / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    assert config["n_head"] == 2
    path.write_text(json.dumps({**config, "n_head": 4}))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was saved"):
        load_model(run)
    assert main(["generate", str(run), "--max-tokens", "3"]) == 2
    assert "digest" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="digest"):
        export_checkpoint(run, tmp_path / "onnx", verify=False, quiet=True)
    assert not (tmp_path / "onnx").exists()


def test_weights_changed_by_hand_are_caught(run):
    path = run / "ckpt" / "model.safetensors"
    weights = load_file(str(path))
    weights["ln_f.weight"] = weights["ln_f.weight"] * 2
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    save_file(weights, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="digest"):
        load_model(run)


def test_checkpoints_without_a_digest_still_load(run, trained_ckpt):
    """Checkpoints written before the digest existed (or by other tools) load as before."""
    path = run / "ckpt" / "model.safetensors"
    weights = load_file(str(path))
    save_file(weights, str(path))  # no metadata at all
    model, _, _ = load_model(run)
    original, _, _ = load_model(trained_ckpt)
    x = mx.array([[1, 2, 3]])
    assert np.array_equal(np.array(model(x)), np.array(original(x)))


def test_saved_checkpoints_carry_the_digest(trained_ckpt):
    from safetensors import safe_open

    with safe_open(str(trained_ckpt / "model.safetensors"), "np") as f:
        assert len(f.metadata()[DIGEST_KEY]) == 64
