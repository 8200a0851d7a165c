"""Training: checkpoints, resume equivalence, divergence handling, bad input."""

from __future__ import annotations

import json
import math
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_train_config

from mlxgpt.checkpoint import CheckpointError, read_weights, resolve
from mlxgpt.config import ConfigError, load_train_config
from mlxgpt.data import DataError
from mlxgpt.model import GPT
from mlxgpt.model_io import load_model, save_checkpoint
from mlxgpt.tokenizer import Tokenizer
from mlxgpt.train import TrainingDiverged, resolve_config, train


def test_training_lowers_the_loss_and_writes_everything(trained_ckpt):
    out = trained_ckpt.parent
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert len(steps) == 40 and [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_loss"] < math.log(40) - 1  # far below a uniform guess
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert (out / "loss.png").stat().st_size > 1000
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_config.json",
        "optimizer.safetensors",
        "state.json",
    ]:
        assert (trained_ckpt / name).is_file()
    assert json.loads((trained_ckpt / "state.json").read_text())["step"] == 40


def test_checkpoint_round_trip(tmp_path):
    tok = Tokenizer.train_char(["abcdefg\n"])
    from mlxgpt.config import GPTConfig

    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(tmp_path / "ckpt", model, tok)
    again, tok2, path = load_model(tmp_path)  # the out_dir holding ckpt/ is accepted
    x = mx.array([[1, 2, 3]])
    assert np.array_equal(np.array(model(x)), np.array(again(x)))
    assert tok2.encode("gab") == tok.encode("gab") and path == tmp_path / "ckpt"


def test_resumed_run_reaches_the_same_losses(corpus_file, tmp_path):
    full = train(
        tiny_train_config(corpus_file, tmp_path / "a", max_iters=30, model={"dropout": 0.1}),
        progress=False,
        quiet=True,
    )
    first = train(
        tiny_train_config(
            corpus_file, tmp_path / "b", max_iters=30, stop_at=12, model={"dropout": 0.1}
        ),
        progress=False,
        quiet=True,
    )
    assert first.step == 12
    cfg = resolve_config(None, {}, resume=str(tmp_path / "b"))  # as `mlxgpt train --resume`
    assert cfg.stop_at == 0 and cfg.max_iters == 30
    rest = train(
        cfg,
        resume=str(tmp_path / "b"),
        progress=False,
        quiet=True,
    )
    assert rest.start_step == 12 and rest.step == 30
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=1e-5)
    assert rest.val_loss == pytest.approx(full.val_loss, rel=1e-5)
    a = read_weights(resolve(tmp_path / "a"), full.model.config)
    b = read_weights(resolve(tmp_path / "b"), full.model.config)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_train_config(corpus_file, out, max_iters=20), progress=False, quiet=True)
    cfg = tiny_train_config(
        corpus_file,
        out,
        max_iters=60,
        learning_rate=1e30,
        warmup_iters=0,
        grad_clip=0.0,
        ckpt_interval=1,
    )
    with pytest.raises(TrainingDiverged, match="intact") as info:
        train(cfg, resume=str(out), progress=False, quiet=True)
    failed_at = int(re.search(r"(?:at|after) step (\d+)", str(info.value)).group(1))
    model, _, ckpt = load_model(out)  # still loads: weights are checked finite on load
    saved_step = json.loads((ckpt / "state.json").read_text())["step"]
    assert 20 <= saved_step < failed_at
    assert np.isfinite(np.array(model(mx.array([[1, 2]])))).all()


def test_atomic_write_failure_leaves_the_old_checkpoint(tmp_path, trained_ckpt):
    from mlxgpt.checkpoint import write_atomic_dir

    target = tmp_path / "ck"
    write_atomic_dir(target, lambda d: (d / "config.json").write_text("{}"))

    def broken(d):
        (d / "config.json").write_text('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic_dir(target, broken)
    assert (target / "config.json").read_text() == "{}"
    assert not (tmp_path / "ck.tmp").exists()


def test_interrupted_swap_is_recovered(tmp_path, trained_ckpt):
    """A crash between the two renames leaves DIR.old, which resolve() still finds."""
    import shutil

    shutil.copytree(trained_ckpt, tmp_path / "ckpt.old")
    assert resolve(tmp_path) == tmp_path / "ckpt.old"


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, trained_ckpt):
    import shutil

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not an mlxgpt checkpoint"):
        load_model(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(trained_ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(bad)
    shutil.copy(trained_ckpt / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text("{ nope")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_model(bad)
    (bad / "config.json").write_text(
        json.dumps({"n_layer": 3, "n_embd": 32, "n_head": 2, "vocab_size": 5, "block_size": 32})
    )
    with pytest.raises(CheckpointError, match="does not match config.json"):
        load_model(bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        load_model(bad)


def test_unknown_config_keys_and_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="unknown config key.*lerning_rate"):
        load_train_config(None, {"lerning_rate": 1})
    with pytest.raises(ConfigError, match="unknown config key.*model.n_layers"):
        load_train_config(None, {"model": {"n_layers": 1}})
    with pytest.raises(ConfigError, match="max_iters expects a int"):
        load_train_config(None, {"max_iters": "many"})
    with pytest.raises(ConfigError, match="divisible"):
        load_train_config(None, {"model": {"n_embd": 30, "n_head": 4}})
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        load_train_config(None, {"batch_size": 0})
    with pytest.raises(ConfigError, match="not found"):
        load_train_config("no-such-preset", {})


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a text"),
        (b"caf\xe9 latin-1", "not UTF-8"),
    ],
)
def test_bad_data_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        train(tiny_train_config(path, tmp_path / "out"), progress=False, quiet=True)


def test_too_little_data_for_one_window(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("tiny text")
    with pytest.raises(DataError, match="block_size"):
        train(tiny_train_config(path, tmp_path / "out"), progress=False, quiet=True)


def test_folder_of_text_files_and_bpe(tmp_path, corpus_file):
    folder = tmp_path / "texts"
    folder.mkdir()
    text = corpus_file.read_text()
    (folder / "a.txt").write_text(text[: len(text) // 2])
    (folder / "b.txt").write_text(text[len(text) // 2 :] + " 私は学校へ行く 😀")
    result = train(
        tiny_train_config(
            folder,
            tmp_path / "out",
            tokenizer="bpe",
            bpe_vocab_size=300,
            max_iters=10,
            eval_interval=10,
            ckpt_interval=10,
        ),
        progress=False,
        quiet=True,
    )
    assert result.tokenizer.kind == "bpe" and result.model.config.vocab_size == 300
    assert math.isfinite(result.val_loss)


def test_gradient_accumulation_equals_one_big_batch(corpus_file, tmp_path):
    """2 micro-batches of 4 windows give the same losses and weights as 1 batch of 8."""
    big = train(
        tiny_train_config(corpus_file, tmp_path / "big", batch_size=8, max_iters=6),
        progress=False,
        quiet=True,
    )
    accum = train(
        tiny_train_config(corpus_file, tmp_path / "acc", batch_size=4, grad_accum=2, max_iters=6),
        progress=False,
        quiet=True,
    )
    np.testing.assert_allclose(accum.losses, big.losses, rtol=1e-5)
    a = read_weights(resolve(tmp_path / "big"), big.model.config)
    b = read_weights(resolve(tmp_path / "acc"), big.model.config)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5)


def test_resume_with_a_config_file_is_refused(capsys, trained_ckpt):
    from mlxgpt.cli import main

    assert main(["train", "--resume", str(trained_ckpt), "--config", "tiny-char"]) == 2
    assert "drop --config" in capsys.readouterr().err


def log_rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_uncompiled_training_matches_compiled(corpus_file, tmp_path):
    runs = {
        flag: train(
            tiny_train_config(corpus_file, tmp_path / str(flag), max_iters=8, compile=flag),
            progress=False,
            quiet=True,
        )
        for flag in (True, False)
    }
    np.testing.assert_allclose(runs[False].losses, runs[True].losses, rtol=1e-4)
    a = read_weights(resolve(tmp_path / "True"), runs[True].model.config)
    b = read_weights(resolve(tmp_path / "False"), runs[True].model.config)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-4)


def test_bfloat16_training_resumes_exactly(corpus_file, tmp_path):
    """bf16 weights and optimizer state survive the float32 checkpoint round trip.
    (Uncompiled: compiling the bf16 graph takes MLX's CPU backend ~20 s.)"""
    settings = dict(max_iters=10, dtype="bfloat16", compile=False, model={"dropout": 0.1})
    full = train(
        tiny_train_config(corpus_file, tmp_path / "a", **settings), progress=False, quiet=True
    )
    first = train(
        tiny_train_config(corpus_file, tmp_path / "b", stop_at=4, **settings),
        progress=False,
        quiet=True,
    )
    cfg = resolve_config(None, {}, resume=str(tmp_path / "b"))
    rest = train(cfg, resume=str(tmp_path / "b"), progress=False, quiet=True)
    assert rest.model.wte.weight.dtype == mx.bfloat16 and cfg.dtype == "bfloat16"
    assert first.losses + rest.losses == full.losses
    assert all(math.isfinite(v) for v in full.losses) and full.losses[-1] < full.losses[0]


def test_gradient_norm_is_logged_when_clipping_is_off(corpus_file, tmp_path):
    """The log's grad_norm is the norm before clipping, clipping on or off (same first step)."""
    for clip in (1.0, 0.0):
        train(
            tiny_train_config(
                corpus_file, tmp_path / str(clip), max_iters=3, warmup_iters=1, grad_clip=clip
            ),
            progress=False,
            quiet=True,
        )
    clipped, unclipped = (
        [r["grad_norm"] for r in log_rows(tmp_path / name) if "loss" in r]
        for name in ("1.0", "0.0")
    )
    assert all(n > 0 for n in unclipped)
    assert unclipped[0] == pytest.approx(clipped[0], rel=1e-5)


def test_resuming_a_finished_run_says_so(capsys, trained_ckpt):
    from mlxgpt.cli import main

    out = trained_ckpt.parent
    before = (out / "log.jsonl").read_bytes()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "already at step 40" in captured.err and "max_iters=80" in captured.err
    assert "nan" not in captured.out + captured.err
    assert (out / "log.jsonl").read_bytes() == before


def test_loss_plot_leaves_matplotlib_alone(corpus_file, tmp_path):
    """Training draws loss.png without switching the backend or leaving pyplot figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figures = plt.get_fignums()
        train(
            tiny_train_config(corpus_file, tmp_path / "run", max_iters=2, warmup_iters=1),
            progress=False,
            quiet=True,
        )
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
        assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)


def numpy_adamw(params, grads_per_step, cfg):
    """PyTorch's AdamW (bias-corrected, decoupled decay on 2-D weights only) under the
    README's schedule (linear warmup to learning_rate, cosine decay to min_lr), in float64."""
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1, b2, eps, w = cfg.beta1, cfg.beta2, 1e-8, cfg.warmup_iters
    for t, grads in enumerate(grads_per_step, 1):
        it = t - 1
        if it < w:
            lr = cfg.learning_rate / w + (cfg.learning_rate - cfg.learning_rate / w) * it / w
        else:
            s = min(it - w, cfg.max_iters - w) / (cfg.max_iters - w)
            lr = cfg.min_lr + 0.5 * (1 + math.cos(math.pi * s)) * (cfg.learning_rate - cfg.min_lr)
        for k, g in grads.items():
            decay = cfg.weight_decay if params[k].ndim >= 2 else 0.0
            params[k] = params[k] * (1 - lr * decay)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            params[k] = params[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def test_adamw_matches_pytorchs_bias_corrected_update():
    from mlxgpt.train import make_optimizer

    cfg = load_train_config(
        None,
        {
            "max_iters": 6,
            "warmup_iters": 2,
            "learning_rate": 0.05,
            "min_lr": 0.005,
            "weight_decay": 0.1,
            "beta1": 0.9,
            "beta2": 0.99,
        },
    )
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    grads = [{k: rng.normal(size=p.shape) for k, p in start.items()} for _ in range(5)]
    optimizer = make_optimizer(cfg)
    params = {k: mx.array(p, dtype=mx.float32) for k, p in start.items()}
    optimizer.init(params)
    for g in grads:
        params = optimizer.apply_gradients(
            {k: mx.array(x, dtype=mx.float32) for k, x in g.items()}, params
        )
    expected = numpy_adamw(dict(start), grads, cfg)
    for k in start:
        np.testing.assert_allclose(np.array(params[k]), expected[k], rtol=1e-5, atol=1e-6)
    # and the first step moves every weight by about the learning rate (bias-corrected)
    one = make_optimizer(cfg)
    p0 = {"b": mx.zeros((4,))}
    one.init(p0)
    step = np.array(one.apply_gradients({"b": mx.array([1.0, -2.0, 3.0, -4.0])}, p0)["b"])
    np.testing.assert_allclose(np.abs(step), cfg.learning_rate / cfg.warmup_iters, rtol=1e-5)
