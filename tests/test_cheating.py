"""The "cheating" demo: without the causal mask the training loss falls, the honest loss rises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"


def load_demo():
    """Import scripts/demo_cheating.py (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "demo_cheating", ROOT / "scripts" / "demo_cheating.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


demo = load_demo()

# Small enough to train both models in a few seconds. The unmasked model finds the "copy
# the next token" shortcut suddenly, after a number of steps that grows with the context
# (attention starts out spread evenly over the window, diluting the signal). With a
# 4-token context and 200 steps it found it for every one of 21 seeds tried (0-19, 1337):
# training-loss gap >= 1.48 and honest-loss gap >= 1.17 nats, against the 0.5 asserted.
FAST = dict(
    steps=200,
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=4,
    batch_size=64,
    learning_rate=1e-2,
    eval_iters=10,
    sample_tokens=60,
    progress=False,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cheating")
    data = tmp / "shakespeare_100k.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return demo.run_demo(data=data, out_dir=tmp / "out", **FAST)


def test_unmasked_model_has_lower_training_loss(results):
    masked, cheat = results["with_mask"], results["without_mask"]
    assert cheat.train_loss < masked.train_loss - 0.5


def test_unmasked_model_has_higher_honest_loss(results):
    masked, cheat = results["with_mask"], results["without_mask"]
    assert cheat.honest_val_loss > masked.honest_val_loss + 0.5
    assert cheat.honest_train_loss > masked.honest_train_loss + 0.5


def test_as_trained_loss_agrees_with_the_training_record(results):
    """(1) measures each model the way it trained: it matches the loss training logged.

    The per-step losses come from the training loop itself, on other batches, so this
    checks the measurement against an independent record (for the unmasked model, the
    honest loss is 3+ nats away from it; in 3 seeds tried the gap here was <= 0.1).
    """
    masked, cheat = results["with_mask"], results["without_mask"]
    assert masked.causal_mask and not cheat.causal_mask
    for v in (masked, cheat):
        logged = sum(v.step_losses[-20:]) / 20
        assert abs(v.train_loss - logged) < 0.25, (v.train_loss, logged)


def test_demo_command_line_error_is_one_line(tmp_path, capsys):
    argv = ["--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path), "--no-progress"]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data path") and "Traceback" not in err


def test_report_and_plot(results, tmp_path):
    report = demo.format_report(results, "python scripts/demo_cheating.py --steps 200")
    for v in results.values():
        assert f"{v.train_loss:.3f}" in report and f"{v.honest_val_loss:.3f}" in report
        assert len(v.sample) > 0 and v.sample.lstrip("\n").split("\n")[0][:10] in report
        assert len(v.step_losses) == FAST["steps"]
    png = demo.plot_losses(results, tmp_path / "cheating.png")
    from matplotlib.image import imread

    assert imread(png).shape[:2] == (540, 960)  # 8 x 4.5 inches at 120 dpi


def test_demo_command_reports_user_errors(tmp_path, capsys):
    code = demo.main(["--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "o")])
    assert code == 2 and "\nerror: data path" in capsys.readouterr().err
