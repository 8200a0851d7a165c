"""Data-parallel training on several processes with MLX's own distributed engine.

``mlx.launch -n N ... python -m mlxgpt train ...`` starts N copies of the same training
run (*ranks*), on one machine or several; MLX's ``mx.distributed`` connects them (ring
over TCP, JACCL over Thunderbolt, NCCL on NVIDIA GPUs, or MPI). This module holds the
pieces the training loop needs, so that ``mlxgpt/train.py`` stays one loop:

* :class:`World` — this process's rank and the number of ranks, with the few collectives
  training uses (sum, broadcast from rank 0, gather of small JSON values, barrier). A
  process not started by a launcher is ``World()``: rank 0 of 1, nothing initialised,
  every collective the identity — a single-process run pays nothing.
* :class:`StreamSampler` — the training batches. The data is drawn as ``S`` independent
  *streams* (``S`` = the number of ranks when the run starts, or ``data_streams``);
  stream ``s`` is a ``numpy`` generator seeded ``[seed, s]`` (stream 0 is exactly the
  single-process generator), and each rank draws ``batch_size`` windows from every
  stream it owns. A step therefore sees ``S * batch_size`` windows whatever the number
  of ranks, which is what makes a 2-rank run equal (up to rounding) to one process that
  owns both streams, and lets a run saved by ``N`` ranks continue on any number of ranks
  that divides ``S``.
* :class:`Watchdog` — a rank whose partner died or hung would wait in a collective for
  ever. MLX raises when a peer's socket closes (kill -9 of a local rank), but not when a
  peer hangs; the watchdog ends a rank that has made no progress for ``dist_timeout``
  seconds with a message saying what happened and how to resume, and turns the
  ``SIGTERM`` that ``mlx.launch`` sends to the surviving ranks into such a message too.

Gradients are averaged inside the compiled step with :func:`mlx.nn.average_gradients`
(one ``all_sum`` over all gradients concatenated), so every rank applies the same update
and the replicas stay identical; rank 0's weights are broadcast once at the start so they
start identical even on machines whose random-number kernels differ.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlxgpt.data import BatchSampler, Dataset
from mlxgpt.errors import UserError

# Variables a launcher sets in every rank's environment: mlx.launch (ring, JACCL, NCCL),
# JACCL's alias, Open MPI's mpirun. Without one of them no distributed set-up is tried.
LAUNCH_ENV = ("MLX_RANK", "JACCL_RANK", "OMPI_COMM_WORLD_SIZE")
EXIT_TIMEOUT, EXIT_TERMINATED = 2, 143  # an error line (2), SIGTERM's conventional 128 + 15
EXIT_GRACE_S = 10.0  # a failing rank's time to print its error and exit


class DistributedError(UserError, RuntimeError):
    """Ranks that cannot work together (lost peer, mismatched runs); says what to do."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    group: Any = None  # mx.distributed.Group when size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that prints, logs and writes checkpoints."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def all_sum(self, x: mx.array) -> mx.array:
        """Sum of ``x`` over every rank (``x`` itself in a single process)."""
        if self.size == 1:
            return x
        return mx.distributed.all_sum(x, group=self.group)

    def broadcast(self, tree: Any) -> Any:
        """Rank 0's arrays in ``tree``, on every rank (a sum of rank 0's values and zeros,
        which is exact)."""
        if self.size == 1:
            return tree
        return tree_map(lambda a: self.all_sum(a if self.is_main else mx.zeros_like(a)), tree)

    def gather_json(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (anything JSON can hold), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), dtype=np.uint8)
        lengths = np.zeros(self.size, dtype=np.int32)
        lengths[self.rank] = len(data)
        lengths = np.array(_evaluated(self.all_sum(mx.array(lengths))))
        slots = np.zeros((self.size, int(lengths.max())), dtype=np.uint8)
        slots[self.rank, : len(data)] = data  # each row is written by one rank only
        slots = np.array(_evaluated(self.all_sum(mx.array(slots))))
        return [json.loads(bytes(row[:n])) for row, n in zip(slots, lengths, strict=True)]

    def barrier(self) -> None:
        """Return once every rank has called it."""
        if self.size > 1:
            _evaluated(self.all_sum(mx.array(1, dtype=mx.int32)))

    def average_gradients(self, grads: Any) -> Any:
        """The mean of ``grads`` over the ranks (unchanged in a single process); meant to run
        inside the compiled training step."""
        if self.size == 1:
            return grads
        return nn.average_gradients(grads, group=self.group)

    def sum_float(self, value: float) -> float:
        """The sum of ``value`` over the ranks (float32)."""
        if self.size == 1:
            return value
        return _evaluated(self.all_sum(mx.array(value, dtype=mx.float32))).item()

    def mean(self, x: mx.array) -> mx.array:
        """The mean of ``x`` over the ranks."""
        return x if self.size == 1 else self.all_sum(x) / self.size


SINGLE = World()  # a process on its own


def _evaluated(x: mx.array) -> mx.array:
    mx.eval(x)  # waits with the GIL released, so the watchdog can act meanwhile
    return x


def launched() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process as one rank of many."""
    return any(name in os.environ for name in LAUNCH_ENV)


_WORLD: World | None = None


def init_world(timeout: float) -> World:
    """The world this process belongs to, connecting to the other ranks on first call.

    Without a launcher's environment this is ``World()`` and nothing is initialised.
    Connecting holds Python's interpreter lock, so a Python watchdog cannot run meanwhile;
    :mod:`faulthandler`'s C timer ends a rank that waits longer than ``timeout`` seconds
    for its peers (printing where it waited).
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    expected_rank = os.environ.get("MLX_RANK") or os.environ.get("JACCL_RANK")
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        group = mx.distributed.init()
    except RuntimeError as err:
        raise DistributedError(
            f"rank {expected_rank}: could not connect to the other ranks ({err}). Check that "
            "every host in the hostfile is reachable on the listed IPs and ports, and that "
            "no other run uses those ports (mlx.launch --starting-port)."
        ) from None
    finally:
        faulthandler.cancel_dump_traceback_later()
    if group.size() == 1 and expected_rank not in (None, "0"):
        raise DistributedError(
            f"this process was launched as rank {expected_rank} but MLX formed no group with "
            "the other ranks: check the hostfile (MLX_HOSTFILE) and the chosen backend"
        )
    _WORLD = World(rank=group.rank(), size=group.size(), group=group if group.size() > 1 else None)
    return _WORLD


def lost_peer(err: RuntimeError, world: World, during: str, resume_hint: str) -> Exception:
    """A :class:`DistributedError` for a collective that failed because a peer went away
    (MLX's backends raise ``RuntimeError("[ring] ...")`` and the like); ``err`` itself
    when it is anything else."""
    text = str(err)
    if world.size == 1 or not text.startswith(("[ring]", "[mpi]", "[nccl]", "[jaccl]")):
        return err
    return DistributedError(
        f"{world}: lost the connection to another rank during {during} ({text}). Another "
        f"rank has probably stopped: its own messages say why. {resume_hint}"
    )


# -- the data streams -------------------------------------------------------------------------
def stream_seed(seed: int, stream: int) -> int | list[int]:
    """The seed of data stream ``stream``: ``seed`` for stream 0 (a single-process run draws
    exactly the batches it always did), ``[seed, stream]`` for the others."""
    return seed if stream == 0 else [seed, stream]


def owned_streams(n_streams: int, world: World) -> range:
    """The streams rank ``world.rank`` draws from: a contiguous share of ``n_streams``.

    Raises :class:`DistributedError` when the ranks cannot share the streams evenly
    (every rank must compute on the same number of windows for the average to be right).
    """
    if n_streams % world.size:
        raise DistributedError(
            f"this run draws its batches from {n_streams} data stream(s) (one per rank it "
            f"started with), which {world.size} ranks cannot share evenly. Resume it with a "
            f"number of ranks that divides {n_streams} (mlx.launch -n ...)."
        )
    share = n_streams // world.size
    return range(world.rank * share, (world.rank + 1) * share)


class StreamSampler:
    """Training batches from the data streams this rank owns (see the module docstring):
    one :class:`~mlxgpt.data.BatchSampler` per stream.

    :meth:`next` gives ``(micro_batches, len(streams) * batch_size, block_size)`` inputs
    and targets, stream by stream along the batch axis (one stream: exactly its sampler's
    batches); :meth:`states` / :meth:`set_states` save and restore every owned stream's
    generator (JSON).
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        block_size: int,
        seed: int,
        streams: Sequence[int] = (0,),
    ):
        self.streams = tuple(streams)
        self.samplers = [
            BatchSampler(data, batch_size, block_size, stream_seed(seed, s)) for s in self.streams
        ]

    def next(self, micro_batches: int = 1) -> tuple[np.ndarray, np.ndarray]:
        if len(self.samplers) == 1:
            return self.samplers[0].next(micro_batches)
        xs, ys = zip(*(s.next(micro_batches) for s in self.samplers), strict=True)
        return np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)

    def states(self) -> dict[int, dict[str, Any]]:
        """Each owned stream's generator state, by stream number."""
        return {s: sampler.state() for s, sampler in zip(self.streams, self.samplers, strict=True)}

    def set_states(self, states: Sequence[Any]) -> None:
        """Restore the owned streams from ``states`` (the states of *all* streams, by
        number); ``ValueError`` if one is missing or is not a generator state."""
        for s, sampler in zip(self.streams, self.samplers, strict=True):
            if not 0 <= s < len(states):
                raise ValueError(f"stream {s}: no saved state ({len(states)} saved)")
            try:
                sampler.set_state(states[s])
            except ValueError as err:
                raise ValueError(f"stream {s}: {err}") from None


def gather_stream_states(sampler: StreamSampler, world: World) -> list[dict[str, Any]]:
    """Every stream's generator state in stream order (a collective: every rank calls it)."""
    merged: dict[int, Any] = {}
    for part in world.gather_json({str(s): v for s, v in sampler.states().items()}):
        merged.update({int(s): v for s, v in part.items()})
    return [merged[s] for s in sorted(merged)]


# -- agreement between ranks ------------------------------------------------------------------
def check_same_run(world: World, **facts: Any) -> None:
    """Fail clearly unless every rank reports the same ``facts`` (step, settings, versions).

    Catches ranks that resumed from different copies of a checkpoint or run different
    versions of mlxgpt/MLX, which would otherwise train silently apart.
    """
    if world.size == 1:
        return
    everyone = world.gather_json(facts)
    for key in facts:
        values = [f[key] for f in everyone]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
            raise DistributedError(
                f"the ranks disagree on {key} ({shown}). Every machine must run the same "
                "mlxgpt and MLX versions with the same command, data and out_dir contents "
                "(to resume on several machines, give each the same OUT_DIR/ckpt: a shared "
                "folder or a copy)."
            )


def digest(value: Any) -> str:
    """A short fingerprint of a JSON-able value, for :func:`check_same_run`."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- the watchdog -----------------------------------------------------------------------------
class Watchdog:
    """Ends this rank with a clear message when it makes no progress for ``timeout`` s, or
    when it receives SIGTERM (what ``mlx.launch`` sends the other ranks once one fails).

    The training loop calls :meth:`beat` whenever it makes progress (each step, each
    evaluation, each checkpoint). A thread sleeps in ``select`` until the deadline or a
    signal byte; collectives wait with Python's interpreter lock released, so it runs while
    the main thread is stuck in one. Only distributed runs start one.
    """

    def __init__(self, world: World, timeout: float, resume_hint: str):
        self.world, self.timeout, self.resume_hint = world, timeout, resume_hint
        self.what, self.deadline = "start-up", time.monotonic() + timeout
        self._closed = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_fd = signal.set_wakeup_fd(self._write)
        self._old_handler = signal.signal(signal.SIGTERM, lambda *_: None)
        self._thread = threading.Thread(target=self._watch, name="mlxgpt-watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str) -> None:
        """Progress: the next ``timeout`` seconds are allowed for ``what``."""
        self.what, self.deadline = what, time.monotonic() + self.timeout

    def close(self, failing: bool = False) -> None:
        """Stop watching. ``failing``: the rank is leaving with an error, whose message must
        not be cut short by the SIGTERM that mlx.launch sends once another rank has failed
        too; SIGTERM stays ignored, and a C timer ends the process if it is still there
        after ``EXIT_GRACE_S`` seconds."""
        self._closed = True
        signal.set_wakeup_fd(self._old_fd)
        if failing:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)
        else:
            signal.signal(signal.SIGTERM, self._old_handler)
        os.write(self._write, b"\0")
        self._thread.join()
        os.close(self._read)
        os.close(self._write)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(failing=exc_type is not None)

    def _watch(self) -> None:
        while not self._closed:
            wait = max(0.0, self.deadline - time.monotonic())
            ready, _, _ = select.select([self._read], [], [], wait)
            if ready:
                if signal.SIGTERM in os.read(self._read, 64) and not self._closed:
                    self._die(
                        f"{self.world}: stopped by SIGTERM during {self.what}. mlx.launch "
                        "stops every rank once one of them fails: its messages above say "
                        f"which rank and why. {self.resume_hint}",
                        EXIT_TERMINATED,
                    )
            elif time.monotonic() >= self.deadline and not self._closed:
                self._die(
                    f"{self.world}: no progress for {self.timeout:g} s during {self.what}: "
                    "another rank has probably died or hung (a lost machine or network, or a "
                    "deadlock in the backend). If the run is only slow, raise dist_timeout. "
                    f"{self.resume_hint}",
                    EXIT_TIMEOUT,
                )

    def _die(self, message: str, status: int) -> None:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(status)
