"""Data-parallel training: 2 ranks over MLX's ring backend on localhost, via mlx.launch.

Every launched run has a hard timeout (the whole process group is killed, and the test
fails with the output so far), uses random free ports, and trains a tiny model for a few
steps. The reference for "2 ranks compute the right thing" is one process that owns both
data streams (``data_streams=2``): the same windows, one batch of twice the size.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from mlxgpt.checkpoint import read_weights, resolve
from mlxgpt.distributed import (
    DistributedError,
    StreamSampler,
    World,
    gather_stream_states,
    init_world,
    launched,
    owned_streams,
    stream_seed,
)
from mlxgpt.train import resolve_config, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_distributed as bench  # noqa: E402
from bench_distributed import ring_command  # noqa: E402  (the benchmark's mlx.launch line)

MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
RUN_TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite


# -- the harness --------------------------------------------------------------------------------
def tiny_args(corpus: Path, out: Path, **extra: object) -> list[str]:
    """`mlxgpt train` arguments for the conftest's tiny model."""
    values = {
        "batch_size": 4,
        "max_iters": 6,
        "warmup_iters": 2,
        "eval_interval": 3,
        "eval_iters": 2,
        "ckpt_interval": 3,
        "learning_rate": 3e-3,
        "sample_tokens": 0,
        "model.block_size": 32,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        **extra,
    }
    return [
        "train",
        "--data",
        str(corpus),
        "--out-dir",
        str(out),
        "--no-progress",
        *(f"{k}={v}" for k, v in values.items()),
    ]


def launch_command(n: int, args: list[str]) -> list[str]:
    assert MLX_LAUNCH.is_file(), f"{MLX_LAUNCH} is missing: pip install mlx (it ships mlx.launch)"
    return ring_command(n, [sys.executable, "-m", "mlxgpt", *args])


def start(n: int, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    for name in ("MLX_RANK", "MLX_HOSTFILE"):
        env.pop(name, None)
    return subprocess.Popen(
        launch_command(n, args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # the launcher and its ranks: one process group to kill
    )


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> str:
    """The run's output; kills the whole process group and fails after ``timeout``."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the distributed run hung for {timeout} s; output:\n{out}")
    return out


def launch(n: int, args: list[str], timeout: float = RUN_TIMEOUT_S) -> str:
    return finish(start(n, args), timeout)


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of the python process running ``rank`` under ``launcher``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("MLX_RANK") == str(rank) and "mlxgpt" in child.cmdline():
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def wait_for_steps(out: Path, steps: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / "log.jsonl"
        if (
            log.is_file()
            and sum('"loss"' in line for line in log.read_text().splitlines()) >= steps
        ):
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {steps} steps logged in {timeout} s; output:\n{proc.communicate()[0]}")


def weights(out: Path) -> dict[str, np.ndarray]:
    ckpt = resolve(out)
    from mlxgpt.checkpoint import read_config

    return read_weights(ckpt, read_config(ckpt))


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], atol=atol, rtol=0, err_msg=name)


# -- in-process pieces ----------------------------------------------------------------------------
def test_a_plain_process_is_a_world_of_one_with_nothing_initialised(monkeypatch):
    for name in ("MLX_RANK", "JACCL_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not launched()
    import mlx.core as mx

    import mlxgpt.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("mx.distributed.init called in a plain process")

    monkeypatch.setattr(dist, "_WORLD", None)
    monkeypatch.setattr(mx.distributed, "init", refuse)
    world = init_world(timeout=1.0)
    assert (world.rank, world.size, world.group) == (0, 1, None) and world.is_main
    assert world.gather_json({"a": 1}) == [{"a": 1}]
    grads = {"w": np.ones(2)}
    assert world.average_gradients(grads) is grads  # identity: the compiled step is unchanged


class _Windows:
    """A stand-in for Dataset.batch: the window starts themselves."""

    def batch(self, split, batch_size, block_size, rng):
        starts = rng.integers(0, 10_000, size=batch_size)
        return starts[:, None] + np.arange(block_size), starts[:, None] + np.arange(block_size) + 1


def test_stream_zero_is_the_single_process_generator_and_streams_differ():
    plain = np.random.default_rng(1337)
    expected = np.stack([_Windows().batch("train", 3, 4, plain)[0] for _ in range(2)])
    x, _ = StreamSampler(_Windows(), 3, 4, 1337, streams=(0,)).next(2)
    np.testing.assert_array_equal(x, expected)
    assert stream_seed(1337, 0) == 1337
    both, _ = StreamSampler(_Windows(), 3, 4, 1337, streams=(0, 1)).next(2)
    one, _ = StreamSampler(_Windows(), 3, 4, 1337, streams=(1,)).next(2)
    assert both.shape == (2, 6, 4)
    np.testing.assert_array_equal(both[:, :3], expected)  # stream by stream on the batch axis
    np.testing.assert_array_equal(both[:, 3:], one)
    assert not np.array_equal(one, expected)


def test_sampler_states_round_trip():
    sampler = StreamSampler(_Windows(), 2, 4, 7, streams=(0, 1, 2))
    sampler.next(3)
    saved = gather_stream_states(sampler, World())
    assert len(saved) == 3
    want, _ = sampler.next(1)
    again = StreamSampler(_Windows(), 2, 4, 7, streams=(1, 2))  # a rank owning two of them
    again.set_states(saved)
    got, _ = again.next(1)
    np.testing.assert_array_equal(got, want[:, 2:])
    with pytest.raises(ValueError, match="stream 1"):
        again.set_states([saved[0], {"bit_generator": "nonsense"}, saved[2]])


def test_streams_are_shared_evenly_or_refused():
    assert owned_streams(2, World(0, 2)) == range(0, 1)
    assert owned_streams(2, World(1, 2)) == range(1, 2)
    assert owned_streams(2, World()) == range(0, 2)
    assert owned_streams(4, World(1, 2)) == range(2, 4)
    with pytest.raises(DistributedError, match="divides 1"):
        owned_streams(1, World(1, 2))


# -- launched runs ---------------------------------------------------------------------------------
def train_in_process(corpus: Path, out: Path, **extra: object):
    """The single-process reference, through the same argument parsing as the CLI."""
    from mlxgpt.config import merge, parse_overrides

    args = tiny_args(corpus, out, **extra)
    overrides = merge(parse_overrides(args[6:]), {"data": str(corpus), "out_dir": str(out)})
    return train(resolve_config(None, overrides, None), progress=False, quiet=True)


@pytest.fixture(scope="module")
def two_ranks(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 6-step run on 2 ranks (checkpoints at steps 3 and 6), and its output."""
    out = tmp_path_factory.mktemp("dp") / "run"
    return out, launch(2, tiny_args(corpus_file, out, sample_tokens=20))


def test_two_ranks_equal_one_process_owning_both_data_streams(two_ranks, corpus_file, tmp_path):
    out, output = two_ranks
    single = tmp_path / "single"
    train_in_process(corpus_file, single, data_streams=2)
    assert_same_weights(out, single, atol=1e-5)
    dp, ref = log_records(out), log_records(single)
    assert [r["step"] for r in dp] == [r["step"] for r in ref] == [1, 2, 3, 3, 4, 5, 6, 6]
    for a, b in zip(dp, ref, strict=True):  # losses: the mean over both ranks' windows
        for key in ("loss", "val_loss", "train_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)
    state = json.loads((out / "ckpt" / "state.json").read_text())
    assert len(state["data_streams"]) == 2 and state["data_rng"] == state["data_streams"][0]
    # rank 0 alone reports: one summary, one sample, one description of the run
    assert output.count("done: step 6") == 1 and output.count("--- sample") == 1
    assert output.count("data parallel: 2 ranks, 2 data streams") == 1
    assert "256 tokens per step" in output  # 2 ranks x 4 windows x 32 tokens


def test_two_ranks_differ_from_one_stream(two_ranks, corpus_file, tmp_path):
    """The two ranks do not draw the same windows (that would train on one stream twice)."""
    single = tmp_path / "single"
    train_in_process(corpus_file, single, batch_size=8)
    assert log_records(single)[0]["loss"] != pytest.approx(log_records(two_ranks[0])[0]["loss"])


def test_resume_on_two_ranks_and_on_one_process(two_ranks, corpus_file, tmp_path):
    full, _ = two_ranks
    half = tmp_path / "half"
    launch(2, tiny_args(corpus_file, half, stop_at=3))
    assert json.loads((half / "ckpt" / "state.json").read_text())["step"] == 3
    one = tmp_path / "one"
    shutil.copytree(half, one)
    output = launch(2, ["train", "--resume", str(half), "--no-progress"])
    assert "resuming" in output and output.count("done: step 6") == 1
    assert_same_weights(half, full, atol=1e-6)
    assert [r["step"] for r in log_records(half)] == [1, 2, 3, 3, 4, 5, 6, 6]
    # the same run continued by one process that draws both streams
    cfg = resolve_config(None, {}, str(one))  # writes where it was pointed: one
    train(cfg, resume=str(one), progress=False, quiet=True)
    assert_same_weights(one, full, atol=1e-5)


def test_resume_refuses_ranks_that_cannot_share_the_streams(trained_ckpt, tmp_path):
    """A single-process run (one stream) cannot be split over 2 ranks: a clear error."""
    run = tmp_path / "run"
    shutil.copytree(trained_ckpt.parent, run)
    output = launch(2, ["train", "--resume", str(run), "--no-progress", "max_iters=60"])
    assert "error:" in output and "1 data stream(s)" in output and "divides 1" in output
    assert "Traceback" not in output
    assert json.loads((run / "ckpt" / "state.json").read_text())["step"] == 40  # untouched


def test_a_killed_rank_stops_the_other_with_a_message(corpus_file, tmp_path):
    out = tmp_path / "run"
    proc = start(2, tiny_args(corpus_file, out, max_iters=100_000, eval_interval=100_000))
    wait_for_steps(out, 3, proc)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    output = finish(proc, timeout=60)
    assert time.monotonic() - killed_at < 30, output
    # rank 0 sees the lost connection (or the launcher's SIGTERM) and says what to do
    assert "error: rank 0 of 2:" in output, output
    assert "lost the connection to another rank" in output or "stopped by SIGTERM" in output
    assert f"--resume {out}" in output


def test_a_hung_rank_is_caught_by_the_watchdog(corpus_file, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(corpus_file, out, max_iters=100_000, eval_interval=100_000, dist_timeout=8)
    proc = start(2, args)
    wait_for_steps(out, 3, proc)
    hung = rank_pid(proc, 1)
    rank0 = rank_pid(proc, 0)
    os.kill(hung, signal.SIGSTOP)  # alive but silent: no socket closes, MLX waits for ever
    stopped_at = time.monotonic()
    try:
        while _alive(rank0) and time.monotonic() - stopped_at < 40:
            time.sleep(0.2)
        waited = time.monotonic() - stopped_at
    finally:
        os.kill(hung, signal.SIGKILL)  # a stopped process ignores the launcher's SIGTERM
    output = finish(proc, timeout=60)
    assert 7 < waited < 30, output
    assert "error: rank 0 of 2: no progress for 8 s during " in output, output
    assert "raise dist_timeout" in output and f"--resume {out}" in output


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_bench_distributed_smoke(capsys):
    """scripts/bench_distributed.py on a tiny model: both rows, the ratio, a real all-reduce."""
    tiny = "--repeats 1 --steps 2 --warmup 1 --n-layer 1 --n-head 2 --n-embd 16 --block-size 16"
    rows = bench.main([*tiny.split(), "--batch-size", "2", "--timeout", str(RUN_TIMEOUT_S)])
    assert [r["ranks"] for r in rows] == [1, 2]
    assert all(r["tok_s"] > 0 for r in rows) and rows[0]["comm_ms"] == 0 < rows[1]["comm_ms"]
    assert "scaling: 2 ranks give" in capsys.readouterr().out
