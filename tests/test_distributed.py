"""Data-parallel training: 2 ranks over MLX's ring backend on localhost, via mlx.launch.

Every launched run has a hard timeout (the whole process group is killed, and the test
fails with the output so far), uses random free ports, and trains a tiny model for a few
steps. The reference for "2 ranks compute the right thing" is one process that owns both
data streams (``data_streams=2``): the same windows, one batch of twice the size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_train_config

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

MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
RUN_TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite


# -- the harness --------------------------------------------------------------------------------
def free_port_pair() -> int:
    """A port P such that P and P + 1 (rank 0 and rank 1 of a local ring) are free now."""
    for _ in range(200):
        port = random.randint(20_000, 60_000)
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free pair of ports found")


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
    return [
        str(MLX_LAUNCH),
        "--backend",
        "ring",
        "-n",
        str(n),
        "--starting-port",
        str(free_port_pair()),
        "--",
        sys.executable,
        "-m",
        "mlxgpt",
        *args,
    ]


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
    """The pid of the python process running ``rank`` under ``launcher`` (Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != launcher.pid:
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, ProcessLookupError):
                continue
            if f"MLX_RANK={rank}".encode() in environ and b"mlxgpt" in cmdline:
                return int(entry.name)
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
    world = init_world()
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
