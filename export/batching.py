"""Continuous batching: many generations decoded together, each getting the tokens it gets alone.

An :class:`Engine` owns one running batch over :meth:`OnnxGPT.forward
<mlxgpt_export.runtime.OnnxGPT.forward>` (numpy and the public forward API only, no HTTP).
Requests (:class:`Job`) join and leave between decode steps. The batch's rows are *live*
(a job's) or *free slots* (a finished job's row, kept to be reused). Every row has a KV
cache row and a mask row, left-padded: ``attention_mask`` is 0 on the padding, positions
come from the mask (:func:`~mlxgpt_export.signature.position_ids_from_mask`), so a row
sees the positions it would see alone and padded keys get exactly zero attention weight.

* **Join.** New jobs' prompts (cropped to their last ``block_size`` tokens, as
  :func:`mlxgpt.sampling.generate_ids` does) are prefilled together, left-padded among
  themselves (with no batch running, they become the batch). If there are enough free
  slots and each joiner's window (its real tokens, ``L``) fits the batch's width ``W``,
  each is written into a free slot in place: zeros on ``W - L`` columns of padding, then
  its keys and values (the rest of the cache is not touched). Otherwise all live rows and
  all joiners are merged into new arrays, left-padded to a common width (one copy; the
  free slots are dropped in it).
* **Decode.** One :meth:`forward` call feeds every row its newest token: a live row the
  token it sampled, a free slot token 0 with its mask cleared to that one column (so its
  position stays 0 and its mask is never all zeros: its row stays finite, and nobody reads
  it). :func:`~mlxgpt.sampling.sample_rows` sees the live rows' logits only.
* **Leave.** A row that draws the end-of-text token (``finish "stop"``), reaches its
  ``max_tokens`` (``"length"``) or is cancelled becomes a free slot at once.
* **Tidy.** After the joins of a step (so every waiting job has had its chance at a slot):
  no live row left drops the batch; more free slots than live rows compacts it to the
  live rows (one copy, cheaper than decoding the free rows on). Otherwise, leading columns
  that no live row uses are trimmed -- a copy too (the slice is not contiguous), so only
  once 16 columns, or a quarter of the width, are unused. A live row holds at most
  ``block_size`` real tokens, so before a step adds its column the cache is narrower than
  ``block_size + 16`` and ``4/3 block_size``, with at most ``max_batch`` rows; positions
  come from each row's own tokens, so they stay inside the window whatever the width.
* **Slide.** A row whose text outgrows the context window follows the runtime's rule:
  its last ``block_size`` tokens are recomputed without a cache. Here that is a re-join:
  the row becomes a free slot and its job is prefilled again from its window at the next
  step (other rows keep their cache).

So in steady state (jobs finishing, others arriving) the cache is not copied when a job
finishes or joins, only to merge joiners that do not fit a slot, to compact and to trim
(:attr:`Engine.stats` counts them). A copy costs about as much as the graph's own copy of
the cache in a decode step (its ``Concat`` of past and new keys): copying at every finish
and join took ~23% of the engine thread at 16 clients.

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

TRIM_COLUMNS = 16  # trim unused leading columns once this many (or a quarter of the width)


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
    """The rows: a job (or ``None``: a free slot), a KV-cache row and a mask row each."""

    jobs: list[Job | None]
    past: Past  # keys and values (rows, heads, width, head_size) of every layer
    mask: np.ndarray  # (rows, width) int64: 1 = a real token, 0 = padding (left)
    logits: np.ndarray  # (rows, vocab): each row's next-token logits

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def live(self) -> list[int]:
        return [row for row, job in enumerate(self.jobs) if job is not None]

    def free(self) -> list[int]:
        return [row for row, job in enumerate(self.jobs) if job is None]

    def unused(self, rows: Sequence[int]) -> int:
        """Leading columns that none of ``rows`` uses (each row has a real token)."""
        first = self.mask.argmax(axis=1)  # each row's first 1 (left padding)
        return int((first if len(rows) == len(self.jobs) else first[rows]).min())

    def put(self, slot: int, other: Batch, row: int) -> None:
        """Write ``other``'s ``row`` (its real tokens) into the free ``slot``, in place."""
        length = int(other.mask[row].sum())
        pad = self.width - length
        for (key, value), (new_key, new_value) in zip(self.past, other.past, strict=True):
            key[slot, :, :pad], value[slot, :, :pad] = 0, 0
            key[slot, :, pad:] = new_key[row, :, -length:]
            value[slot, :, pad:] = new_value[row, :, -length:]
        self.mask[slot, :pad], self.mask[slot, pad:] = 0, 1
        self.logits[slot] = other.logits[row]
        self.jobs[slot] = other.jobs[row]

    def trimmed(self, start: int) -> Batch:
        """The same rows without the first ``start`` columns (a copy: contiguous arrays)."""
        past = [
            (np.ascontiguousarray(k[:, :, start:]), np.ascontiguousarray(v[:, :, start:]))
            for k, v in self.past
        ]
        return Batch(self.jobs, past, np.ascontiguousarray(self.mask[:, start:]), self.logits)


def gather(parts: Sequence[tuple[Batch, list[int]]]) -> Batch:
    """The given rows of each batch, stacked in new arrays (one copy of their caches).

    Each part keeps its columns from the first one its rows use; all are left-padded to
    the widest.
    """
    starts = [batch.unused(rows) for batch, rows in parts]
    width = max(batch.width - start for (batch, _), start in zip(parts, starts, strict=True))
    first = parts[0][0]
    n = sum(len(rows) for _, rows in parts)
    shape = (n, first.past[0][0].shape[1], width, first.past[0][0].shape[3])
    dtype = first.past[0][0].dtype
    past = [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in first.past]
    mask = np.zeros((n, width), np.int64)
    logits = np.empty((n, first.logits.shape[1]), first.logits.dtype)
    jobs: list[Job | None] = []
    top = 0
    for (batch, rows), start in zip(parts, starts, strict=True):
        to, cols = slice(top, top + len(rows)), slice(width - (batch.width - start), None)
        for (key, value), (src_key, src_value) in zip(past, batch.past, strict=True):
            key[to, :, cols] = src_key[rows, :, start:]
            value[to, :, cols] = src_value[rows, :, start:]
        mask[to, cols] = batch.mask[rows, start:]
        logits[to] = batch.logits[rows]
        jobs += [batch.jobs[row] for row in rows]
        top += len(rows)
    return Batch(jobs, past, mask, logits)


def check_capacity(max_batch: int, max_queue: int) -> None:
    if max_batch < 1 or max_queue < 0:
        raise ValueError(f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")


def check_jobs(jobs: Sequence[Job], vocab_size: int) -> None:
    """Raise ``ValueError`` for a job that cannot run (checked before any is queued)."""
    for job in jobs:
        if not job.context:
            raise ValueError("a job needs at least one prompt token")
        check_token_ids(job.context, vocab_size)
        if job.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {job.max_tokens}")


def check_room(live: int, new: int, room: int) -> None:
    """Raise :class:`EngineFull` unless ``new`` more jobs fit beside ``live`` in ``room``."""
    if live + new > room:
        raise EngineFull(
            f"the server is busy ({live} generations running or queued, room for {room}): "
            "retry later"
        )


class Engine:
    """Continuous batching over one :class:`OnnxGPT` (see the module docstring)."""

    def __init__(
        self,
        model: OnnxGPT,
        max_batch: int = Limits.max_batch,
        max_queue: int = Limits.max_queue,
    ):
        check_capacity(max_batch, max_queue)
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
        self.peak_batch = 0  # the most live rows decoded together so far
        self.stopped: str | None = None  # (a ProcessEngine's child may die; a thread does not)
        # how often joiners took a free slot, and how often the cache was copied instead
        self.stats = {"slot_reuses": 0, "merges": 0, "compactions": 0, "trims": 0}

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (all or none). Raises :class:`EngineFull` when there is no room."""
        check_jobs(jobs, self.model.config.vocab_size)
        with self._cond:
            if self._stopping:
                raise EngineFull("the server is shutting down")
            check_room(self._live, len(jobs), self.max_batch + self.max_queue)
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
        """One iteration: admit, sample one token for every live row, decode. False when idle."""
        self._drop_cancelled()
        joining = self._rejoin + self._admit()
        self._rejoin = []
        if joining:
            self._join(self._prefill(joining))
        batch = self._batch = self._tidy(self._batch)
        if batch is None:
            return False
        live = batch.live()
        self.peak_batch = max(self.peak_batch, len(live))
        jobs = [batch.jobs[row] for row in live]
        logits = batch.logits if len(live) == len(batch.jobs) else batch.logits[live]
        tokens = sample_rows(logits, [j.params for j in jobs], [j.rng for j in jobs])
        feed = np.zeros(len(batch.jobs), np.int64)  # free slots are fed token 0
        going = 0
        for row, job, token in zip(live, jobs, tokens, strict=True):
            if self._advance(job, token):
                feed[row] = token
                going += 1
            else:
                batch.jobs[row] = None  # finished or sliding: its row is a free slot now
        self._batch = self._decode(batch, feed) if going else None
        return True

    def _advance(self, job: Job, token: int) -> bool:
        """Send ``job`` its token; False when it finished or slid (its row is free)."""
        if token == self.stop_id:
            self._finish(job, "stop")
            return False
        job.produced += 1
        job.sink.token(token)
        if job.produced == job.max_tokens:
            self._finish(job, "length")
            return False
        job.context.append(token)
        if len(job.context) > self.block:  # the window slides: recompute this job
            job.context = job.context[-self.block :]
            self._rejoin.append(job)
            return False
        return True

    def _join(self, new: Batch) -> None:
        """Put the prefilled rows ``new`` into free slots if all fit, else merge (a copy)."""
        batch = self._batch
        if batch is None:
            self._batch = new
            return
        free = batch.free()
        if len(free) >= len(new.jobs) and new.mask.sum(axis=1).max() <= batch.width:
            for row, slot in enumerate(free[: len(new.jobs)]):
                batch.put(slot, new, row)
            self.stats["slot_reuses"] += len(new.jobs)
        else:  # one copy for all (slotting some first would copy them twice)
            self._batch = gather([(batch, batch.live()), (new, list(range(len(new.jobs))))])
            self.stats["merges"] += 1

    def _tidy(self, batch: Batch | None) -> Batch | None:
        """Drop, compact or trim ``batch`` when that pays (see the module docstring)."""
        if batch is None:
            return None
        live = batch.live()
        if not live:
            return None
        if 2 * len(live) < len(batch.jobs):
            self.stats["compactions"] += 1
            return gather([(batch, live)])
        unused = batch.unused(live)
        if unused >= TRIM_COLUMNS or (unused and 4 * unused >= batch.width):
            self.stats["trims"] += 1
            return batch.trimmed(unused)
        return batch

    def _admit(self) -> list[Job]:
        with self._cond:
            room = self.max_batch - len(self._rejoin)
            room -= 0 if self._batch is None else len(self._batch.live())
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
            jobs = self._batch.jobs
            for row, job in enumerate(jobs):
                if job is not None and self._dropped(job):
                    jobs[row] = None  # a free slot

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

    def _decode(self, batch: Batch, tokens: np.ndarray) -> Batch:
        """Feed every row its newest token after the batch's cache (a free slot: only that)."""
        mask = np.concatenate([batch.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        free = batch.free()
        if free:
            mask[free, :-1] = 0
        logits, past = self.model.forward(tokens[:, None], mask, past=batch.past)
        return Batch(batch.jobs, past, mask, logits[:, -1])

    def _fail_all(self) -> None:
        """After an unexpected error: end every job with ``"error"`` and start clean."""
        jobs = [job for job in self._batch.jobs if job is not None] if self._batch else []
        jobs += self._rejoin
        with self._cond:
            jobs += list(self._waiting)
            self._waiting.clear()
        self._batch, self._rejoin = None, []
        for job in jobs:
            self._finish(job, "error")

    def safe_step(self) -> bool:
        """:meth:`step`, except that an unexpected error (a bug, not bad input: inputs were
        checked) ends the affected jobs with ``"error"`` and returns False instead of raising,
        so the engine keeps serving."""
        try:
            return self.step()
        except Exception:
            log.exception("generation step failed; ending the affected requests")
            self._fail_all()
            return False

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
            self.safe_step()

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
