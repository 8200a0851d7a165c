"""Continuous batching: many generations decoded together, each getting the tokens it gets alone.

An :class:`Engine` owns one running batch over :meth:`OnnxGPT.forward
<mlxgpt_export.runtime.OnnxGPT.forward>` (numpy and the public forward API only, no HTTP).
Requests (:class:`Job`) join and leave between decode steps:

* **Join.** A new job's prompt (cropped to its last ``block_size`` tokens, as
  :func:`mlxgpt.sampling.generate_ids` does) is prefilled on its own rows, then its KV
  cache is merged into the batch: both sides are left-padded to a common length, with
  ``attention_mask`` 0 on the padding. Positions come from the mask
  (:func:`~mlxgpt_export.signature.position_ids_from_mask`), so a row sees the positions
  it would see alone, and padded keys get exactly zero attention weight.
* **Decode.** One :meth:`forward` call feeds every running row its newest token.
* **Leave.** A row that draws the end-of-text token (``finish "stop"``), reaches its
  ``max_tokens`` (``"length"``) or is cancelled is removed from the batch at once, and the
  leading columns that no remaining row uses are trimmed, so the cache never holds more
  than ``max_batch x block_size`` positions.
* **Slide.** A row whose text outgrows the context window follows the runtime's rule:
  its last ``block_size`` tokens are recomputed without a cache. Here that is a re-join:
  the row leaves the batch and is prefilled again from its window (other rows keep their
  cache).

Every job samples by :func:`mlxgpt.sampling.sample_next`'s rule (all rows at once:
:func:`~mlxgpt.sampling.sample_rows`) from its own ``numpy.random.default_rng(seed)``,
one draw per token, in its own order, so a job gets
exactly the tokens ``OnnxGPT.generate_ids`` gives it alone, whatever else is in the
batch (tested in ``tests/test_server_batching.py``).

Capacity is bounded: at most ``max_batch`` rows run, and at most ``max_queue`` more wait;
:meth:`Engine.submit` raises :class:`EngineFull` beyond that instead of queueing without
limit. :meth:`Engine.step` runs one iteration synchronously (tests drive it by hand);
:meth:`Engine.start` runs it in a background thread that sleeps while there is no work.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mlxgpt.sampling import SamplingParams, crop_prompt, sample_rows
from mlxgpt_export.errors import ExportError
from mlxgpt_export.runtime import OnnxGPT, Past, check_token_ids

log = logging.getLogger("mlxgpt_export.batching")


@dataclass(frozen=True)
class Limits:
    """What one server accepts: the defaults of ``mlxgpt-ort serve``'s flags, in one place.

    ``max_batch`` and ``max_queue`` bound the :class:`Engine`; the others bound a request
    (:mod:`mlxgpt_export.server`). Each bounds memory or time per request.
    """

    max_batch: int = 16  # generations decoded together (1 = no batching)
    max_queue: int = 64  # generations waiting for a batch slot; beyond that: 503
    max_tokens: int = 4096  # cap on a request's max_tokens
    max_prompt_tokens: int = 8192  # longer prompts are refused (shorter ones are cropped)
    max_prompts: int = 16  # prompts in one request (each takes a batch slot)
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    max_connections: int = 512  # open connections before uvicorn answers 503


class EngineFull(ExportError):
    """The engine runs ``max_batch`` rows and ``max_queue`` more wait: try again later."""


class Sink(Protocol):
    """Where a job's results go. Called from the engine's thread, in order."""

    def token(self, token_id: int) -> None: ...

    def finish(self, reason: str) -> None:
        """``"stop"`` (end-of-text token), ``"length"`` (max_tokens), ``"error"``."""


@dataclass(eq=False)
class Job:
    """One prompt's generation: what :func:`mlxgpt.sampling.generate_ids` would run alone."""

    prompt_ids: Sequence[int]
    max_tokens: int
    params: SamplingParams
    sink: Sink
    context: list[int] = field(init=False)  # the tokens in the model's window
    produced: int = field(init=False, default=0)
    cancelled: bool = field(init=False, default=False)  # set by any thread; read by the engine

    def __post_init__(self) -> None:
        self.context = list(self.prompt_ids)  # cropped to the window on admission
        self.rng = self.params.rng()


@dataclass
class Batch:
    """The running rows: one job, one KV-cache row and one mask row each (left-padded)."""

    jobs: list[Job]
    past: Past
    mask: np.ndarray  # (rows, total) int64: 1 = a real token, 0 = padding
    logits: np.ndarray  # (rows, vocab): each row's next-token logits

    def select(self, rows: Sequence[int]) -> Batch:
        """The batch restricted to ``rows``, without the columns no kept row uses."""
        mask = self.mask[rows]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if used.size else mask.shape[1]
        return Batch(
            [self.jobs[r] for r in rows],
            [(k[rows, :, start:], v[rows, :, start:]) for k, v in self.past],
            mask[:, start:],
            self.logits[rows],
        )


def left_pad(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Zeros before ``array`` along ``axis`` up to ``width`` (a KV cache or a mask)."""
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)


def merge(a: Batch, b: Batch) -> Batch:
    """Rows of ``a`` then rows of ``b``, both left-padded to the longer cache."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    past = [
        (
            np.concatenate([left_pad(ka, width, 2), left_pad(kb, width, 2)]),
            np.concatenate([left_pad(va, width, 2), left_pad(vb, width, 2)]),
        )
        for (ka, va), (kb, vb) in zip(a.past, b.past, strict=True)
    ]
    mask = np.concatenate([left_pad(a.mask, width, 1), left_pad(b.mask, width, 1)])
    return Batch(a.jobs + b.jobs, past, mask, np.concatenate([a.logits, b.logits]))


class Engine:
    """Continuous batching over one :class:`OnnxGPT` (see the module docstring)."""

    def __init__(
        self,
        model: OnnxGPT,
        max_batch: int = Limits.max_batch,
        max_queue: int = Limits.max_queue,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(
                f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}"
            )
        self.model = model
        self.block = model.config.block_size
        self.stop_id = model.eos_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()  # guarded by _cond
        self._live = 0  # jobs submitted and not yet finished; guarded by _cond
        self._batch: Batch | None = None  # engine thread only
        self._rejoin: list[Job] = []  # rows that slid: prefill again; engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.peak_batch = 0  # the most rows decoded together so far

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (all or none). Raises :class:`EngineFull` when there is no room."""
        for job in jobs:
            if not job.context:
                raise ValueError("a job needs at least one prompt token")
            check_token_ids(job.context, self.model.config.vocab_size)
            if job.max_tokens < 0:
                raise ValueError(f"max_tokens must be >= 0, got {job.max_tokens}")
        with self._cond:
            if self._stopping:
                raise EngineFull("the server is shutting down")
            if self._live + len(jobs) > self.max_batch + self.max_queue:
                raise EngineFull(
                    f"the server is busy ({self._live} generations running or queued, room "
                    f"for {self.max_batch + self.max_queue}): retry later"
                )
            now_done = [job for job in jobs if job.max_tokens == 0]
            self._waiting.extend(job for job in jobs if job.max_tokens > 0)
            self._live += len(jobs) - len(now_done)
            self._cond.notify()
        for job in now_done:
            job.sink.finish("length")

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (its client went away); its slot is freed before the next step."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    def load(self) -> dict[str, int]:
        """How many jobs run and wait, and the limits (for ``/health``)."""
        with self._cond:
            waiting = len(self._waiting)
            return {
                "running": self._live - waiting,
                "waiting": waiting,
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "peak_batch": self.peak_batch,
            }

    # -- the engine thread --------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: admit, sample one token for every row, decode. False when idle."""
        self._drop_cancelled()
        joining = self._rejoin + self._admit()
        self._rejoin = []
        if joining:
            new = self._prefill(joining)
            self._batch = new if self._batch is None else merge(self._batch, new)
        if self._batch is None:
            return False
        batch, self._batch = self._batch, None
        self.peak_batch = max(self.peak_batch, len(batch.jobs))
        jobs = batch.jobs
        tokens = sample_rows(batch.logits, [j.params for j in jobs], [j.rng for j in jobs])
        keep, going = [], []
        for row, (job, token) in enumerate(zip(batch.jobs, tokens, strict=True)):
            if token == self.stop_id:
                self._finish(job, "stop")
                continue
            job.produced += 1
            job.sink.token(token)
            if job.produced == job.max_tokens:
                self._finish(job, "length")
                continue
            job.context.append(token)
            if len(job.context) > self.block:  # the window slides: recompute this row
                job.context = job.context[-self.block :]
                self._rejoin.append(job)
            else:
                keep.append(row)
                going.append(token)
        if keep:  # (select copies the cache: only when a row left)
            kept = batch if len(keep) == len(batch.jobs) else batch.select(keep)
            self._batch = self._decode(kept, going)
        return True

    def _admit(self) -> list[Job]:
        with self._cond:
            room = self.max_batch - len(self._rejoin)
            room -= 0 if self._batch is None else len(self._batch.jobs)
            admitted = []
            while self._waiting and len(admitted) < room:
                job = self._waiting.popleft()
                job.context = crop_prompt(job.context, self.block)
                admitted.append(job)
            return admitted

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [job for job in self._waiting if job.cancelled]
            for job in gone:
                self._waiting.remove(job)
            self._live -= len(gone)
        self._rejoin = [job for job in self._rejoin if not self._dropped(job)]
        if self._batch is not None:
            keep = [r for r, job in enumerate(self._batch.jobs) if not self._dropped(job)]
            if len(keep) < len(self._batch.jobs):
                self._batch = self._batch.select(keep) if keep else None

    def _dropped(self, job: Job) -> bool:
        if job.cancelled:
            with self._cond:
                self._live -= 1
        return job.cancelled

    def _finish(self, job: Job, reason: str) -> None:
        with self._cond:
            self._live -= 1
        job.sink.finish(reason)

    def _prefill(self, jobs: list[Job]) -> Batch:
        """Run the jobs' windows from scratch, left-padded to the longest."""
        width = max(len(job.context) for job in jobs)
        ids = np.zeros((len(jobs), width), dtype=np.int64)  # pad id 0: masked anyway
        mask = np.zeros((len(jobs), width), dtype=np.int64)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.context) :] = job.context
            mask[row, width - len(job.context) :] = 1
        logits, past = self.model.forward(ids, mask)
        return Batch(list(jobs), past, mask, logits[:, -1])

    def _decode(self, batch: Batch, tokens: list[int]) -> Batch:
        """Feed every row its newest token after the batch's cache."""
        mask = np.concatenate([batch.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        logits, past = self.model.forward(np.array(tokens)[:, None], mask, past=batch.past)
        return Batch(batch.jobs, past, mask, logits[:, -1])

    def _fail_all(self) -> None:
        """After an unexpected error: end every job with ``"error"`` and start clean."""
        jobs = (self._batch.jobs if self._batch else []) + self._rejoin
        with self._cond:
            jobs += list(self._waiting)
            self._waiting.clear()
        self._batch, self._rejoin = None, []
        for job in jobs:
            self._finish(job, "error")

    def run_until_idle(self) -> None:
        """Step until no job is left (synchronous; for tests and scripts)."""
        while self.step():
            pass

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._batch or self._rejoin):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug, not bad input (inputs were checked): keep serving
                log.exception("generation step failed; ending the affected requests")
                self._fail_all()

    def start(self) -> None:
        """Run the engine in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="mlxgpt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after its current step; unfinished jobs end with ``"error"``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # still in a step: it ends by itself after it
                return
        self._fail_all()
