"""`mlxgpt viz`: the mask picture, the worked softmax example and the attention grid."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mlxgpt import viz
from mlxgpt.cli import main
from mlxgpt.tokenizer import TokenizerError

ROW = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(0|-inf)\s+(-?\d+\.\d+|-inf)\s+(\d\.\d{6})")


def png_shape(path) -> tuple[int, int]:
    from matplotlib.image import imread

    return imread(path).shape[:2]


def figure_pixels(fig) -> tuple[int, int]:
    width, height = fig.get_size_inches() * viz.DPI
    return round(height), round(width)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("size", [1, 2, 8, 13, 64])
def test_worked_example_is_the_real_softmax(size):
    ex = viz.mask_example(size)
    future = np.arange(size) > ex.row
    assert ex.row == (size - 1) // 2
    assert np.all(ex.mask[future] == np.finfo(np.float32).min) and np.all(ex.mask[~future] == 0)
    assert np.all(ex.probs[future] == 0.0)  # exactly zero, not merely small
    assert np.all(ex.probs[~future] > 0)
    assert abs(ex.probs.astype(np.float64).sum() - 1.0) < 1e-6
    expected = softmax(ex.scores[~future].astype(np.float64))  # softmax over the past only
    np.testing.assert_allclose(ex.probs[~future], expected, atol=1e-6)


def test_worked_example_depends_on_seed_and_row():
    a, b = viz.mask_example(8, seed=0), viz.mask_example(8, seed=1)
    assert not np.allclose(a.scores, b.scores)
    last = viz.mask_example(8, row=7)
    assert np.all(last.mask == 0) and np.all(last.probs > 0)
    with pytest.raises(viz.VizError):
        viz.mask_example(8, row=8)


def test_mask_command_prints_the_real_numbers(tmp_path, capsys):
    path, ex = viz.mask_command(8, out=str(tmp_path / "mask.png"))
    out = capsys.readouterr().out
    rows = [m.groups() for m in map(ROW.match, out.splitlines()) if m]
    assert [int(r[0]) for r in rows] == list(range(8))
    scores = np.array([float(r[1]) for r in rows])
    masked = np.array([r[2] == "-inf" for r in rows])
    probs = np.array([float(r[4]) for r in rows])
    assert list(masked) == [j > ex.row for j in range(8)]
    assert all(r[3] == "-inf" for r in rows if r[2] == "-inf")
    # the printed numbers are the computed ones ...
    np.testing.assert_allclose(scores, ex.scores, atol=5e-5)
    np.testing.assert_allclose(probs, ex.probs, atol=5e-7)
    # ... and a softmax of the printed scores with the future removed reproduces them
    np.testing.assert_allclose(probs[~masked], softmax(scores[~masked]), atol=2e-4)
    assert np.all(probs[masked] == 0) and abs(probs.sum() - 1) < 5e-6
    assert "sum of probabilities: 1.000000" in out and "all exactly 0" in out
    assert f"wrote {path}" in out


def test_mask_png_matches_the_mask(tmp_path):
    path, ex = viz.mask_command(8, out=str(tmp_path / "sub" / "mask.png"))
    fig = viz.draw_mask(8, ex.row)
    (image,) = fig.axes[0].images
    np.testing.assert_array_equal(image.get_array(), np.tril(np.ones((8, 8), dtype=bool)))
    assert png_shape(path) == figure_pixels(fig)


def test_mask_sizes(tmp_path, capsys):
    path, ex = viz.mask_command(100, out=str(tmp_path / "big.png"))
    assert ex is None and "up to 64" in capsys.readouterr().out
    assert png_shape(path) == figure_pixels(viz.draw_mask(100))
    for bad in (0, viz.MAX_MASK_SIZE + 1):
        with pytest.raises(viz.VizError, match="--size must be between 1 and"):
            viz.mask_command(bad, out=str(tmp_path / "x.png"))
    assert main(["viz", "mask", "--size", "300", "--out", str(tmp_path / "y.png")]) == 2
    assert "error: --size must be between 1 and 256" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_mask_default_output_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["viz", "mask", "--size", "5"]) == 0
    assert (tmp_path / "causal_mask_5.png").is_file()
    assert "wrote causal_mask_5.png" in capsys.readouterr().out


def assert_causal(weights: np.ndarray) -> None:
    T = weights.shape[-1]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert np.all(weights[..., future] == 0.0)
    assert np.all(weights[..., ~future] > 0.0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)


def test_attention_command_is_causal(trained_ckpt, tmp_path, capsys):
    prompt = "All:\nSpeak, speak."
    path, maps = viz.attention_command(str(trained_ckpt), prompt, out=str(tmp_path / "a.png"))
    assert maps.weights.shape == (2, 2, len(prompt), len(prompt))  # conftest: 2 layers, 2 heads
    assert maps.dropped == 0
    assert maps.tokens[:6] == ["A", "l", "l", ":", "⏎", "S"] and maps.tokens[11] == "␣"
    assert_causal(maps.weights)
    out = capsys.readouterr().out
    assert "largest weight above the diagonal 0," in out and f"wrote {path}" in out
    fig = viz.draw_attention(maps)
    assert png_shape(path) == figure_pixels(fig)


def test_attention_grid_layout():
    """One panel per (layer, head), in order, each showing exactly that head's weights."""
    rng = np.random.default_rng(0)
    n_layer, n_head, T = 3, 2, 5
    logits = rng.normal(size=(n_layer, n_head, T, T))
    logits[..., np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    maps = viz.AttentionMaps(list("abcde"), weights.astype(np.float32), dropped=0)
    fig = viz.draw_attention(maps, "test")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == n_layer * n_head
    for k, ax in enumerate(panels):
        layer, head = divmod(k, n_head)
        assert ax.get_title() == f"layer {layer} · head {head}"
        shown = ax.images[0].get_array()
        np.testing.assert_array_equal(shown.filled(0), maps.weights[layer, head])
        assert np.array_equal(shown.mask, np.triu(np.ones((T, T), dtype=bool), k=1))
        if layer == n_layer - 1:  # tokens label the keys under each column ...
            assert [t.get_text() for t in ax.get_xticklabels()] == list("abcde")
        if head == 0:  # ... and the queries left of each row
            assert [t.get_text() for t in ax.get_yticklabels()] == list("abcde")
    height, width = figure_pixels(fig)
    assert height > width  # 3 rows of panels, 2 columns


def test_long_prompt_is_cropped_to_the_context_window(trained_ckpt, tmp_path, capsys):
    prompt = "Speak, speak. " * 5  # 70 characters; the conftest model's block_size is 32
    _, maps = viz.attention_command(str(trained_ckpt), prompt, out=str(tmp_path / "a.png"))
    assert maps.weights.shape[-1] == 32 and maps.dropped == len(prompt) - 32
    assert "".join(maps.tokens).replace("␣", " ") == prompt[-32:]
    assert_causal(maps.weights)
    assert "showing its last 32" in capsys.readouterr().out


def test_attention_user_errors(trained_ckpt, tmp_path, capsys):
    with pytest.raises(viz.VizError, match="empty"):
        viz.attention_command(str(trained_ckpt), "", out=str(tmp_path / "a.png"))
    with pytest.raises(TokenizerError):
        viz.attention_command(str(trained_ckpt), "Speak €", out=str(tmp_path / "a.png"))
    assert main(["viz", "attention", str(tmp_path / "missing"), "--prompt", "All"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


# -- a reader's own scores -------------------------------------------------------------------
LESSON = "0.5,0.3,0.8,0.2,0.1"  # raw scores of one query for 5 keys, as in a lesson


def test_mask_with_a_lessons_own_scores(tmp_path, capsys, monkeypatch):
    calls = []
    real = viz.attention_weights
    monkeypatch.setattr(viz, "attention_weights", lambda *a: calls.append(a) or real(*a))
    out = tmp_path / "lesson.png"
    assert main(["viz", "mask", "--scores", LESSON, "--row", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [m.groups() for m in map(ROW.match, printed.splitlines()) if m]
    assert [float(r[1]) for r in rows] == [0.5, 0.3, 0.8, 0.2, 0.1]
    assert [r[2] for r in rows] == ["0", "0", "0", "-inf", "-inf"]  # row 2 sees keys 0..2
    probs = np.array([float(r[4]) for r in rows])
    past = np.exp([0.5, 0.3, 0.8])
    np.testing.assert_allclose(probs, [*past / past.sum(), 0, 0], atol=1e-6)
    assert [f"{p:.3f}" for p in probs] == ["0.316", "0.258", "0.426", "0.000", "0.000"]
    assert len(calls) == 1  # computed by the model's own attention_weights
    assert "Raw scores as given" in printed and png_shape(out) == figure_pixels(viz.draw_mask(5))


def test_scores_default_to_the_middle_row_and_any_row_works():
    assert viz.scores_example([1.0, 2.0, 3.0]).row == 1
    last = viz.scores_example([1.0, 2.0, 3.0], row=2)
    np.testing.assert_allclose(last.probs, np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), atol=1e-6)
    assert viz.scores_example([7.0], row=0).probs.tolist() == [1.0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scores", "0.5,abc"], "expected comma-separated numbers such as 0.5,0.3,0.8; 'abc'"),
        (["--scores", "0.5,,0.1"], "expected comma-separated numbers"),
        (["--scores", "nan,1"], "'nan' is not"),
        (["--row", "-1"], "--row: must be >= 0"),
    ],
)
def test_scores_that_are_not_numbers(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["viz", "mask", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scores", LESSON, "--row", "5"], "--row must be between 0 and 4 (a mask of 5"),
        (["--size", "8", "--row", "8"], "--row must be between 0 and 7"),
        (["--scores", LESSON, "--size", "8"], "--size 8 does not match the 5 scores given"),
        (["--scores", ",".join(["1"] * 65)], "--scores takes 1 to 64 numbers"),
    ],
)
def test_scores_and_rows_out_of_range(argv, message, capsys, tmp_path):
    out = tmp_path / "x.png"
    assert main(["viz", "mask", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and not out.exists()


def test_mask_options_are_refused_for_attention(trained_ckpt, capsys):
    assert main(["viz", "attention", str(trained_ckpt), "--row", "1"]) == 2
    assert "--row belongs to `mlxgpt viz mask`" in capsys.readouterr().err


BACKEND_SCRIPT = """
import sys
import matplotlib
import numpy as np
from mlxgpt import viz

viz.mask_command(5, out=sys.argv[1], row=1)
maps = viz.AttentionMaps(list("ab"), np.array([[[[1, 0], [0.5, 0.5]]]], np.float32), 0)
viz.draw_attention(maps).savefig(sys.argv[1])
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_viz_leaves_matplotlibs_backend_alone(tmp_path):
    """A library must not switch the caller's backend (pyplot's global state)."""
    env = {**os.environ, "MPLBACKEND": "pdf"}  # a caller's choice that is not Agg
    result = subprocess.run(
        [sys.executable, "-c", BACKEND_SCRIPT, str(tmp_path / "m.png")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "pdf False"
    assert png_shape(tmp_path / "m.png")[0] > 0
