"""The batching :class:`~mlxgpt_export.batching.Engine` in a process of its own.

A server that runs the engine in a thread shares one GIL between two busy loops: the engine
(sampling and bookkeeping between onnxruntime runs) and the event loop (a server-sent event
per token per client). Each must wait for the other's time slice: measured with 16
streaming clients on 2 cores, an engine step took 1.8 ms in the server against 1.2 ms alone.
:class:`ProcessEngine` has the thread engine's interface (``submit``, ``cancel``, ``load``,
``start``, ``stop``; plus ``launch``, to start the child before the event loop) and runs
the same :class:`Engine` in a child process, so the two loops run in parallel. Decoding is
unchanged: the child loads the same export folder and steps the same engine, so every job
gets the tokens it gets alone.

Protocol, over one :func:`multiprocessing.Pipe` (pickled tuples):

* parent -> child: ``("submit", [(job_id, prompt_ids, max_tokens, params), ...])``,
  ``("cancel", job_id)``, ``("stop", None)``;
* child -> parent: ``("ready", None)`` or ``("failed", message)`` once, then after every
  step that produced something ``("out", [(job_id, token or finish reason), ...], load)``
  -- one message per step, not per token.

The parent reads in its event loop (``add_reader`` on the pipe: no thread of its own) and
calls each job's :class:`~mlxgpt_export.batching.Sink` there, in the order the child
produced. It keeps the bound on work itself: it knows every job it submitted and which
finished or was cancelled, so ``submit`` raises :class:`~mlxgpt_export.batching.EngineFull`
at once, with no round trip; the child's queue is not bounded a second time (a cancelled
job counts out in the parent at once, in the child's engine only at its next step).

If the child dies (killed, out of memory), every unfinished job ends with ``"error"``,
later submissions raise :class:`EngineStopped` and :attr:`ProcessEngine.stopped` says why
(``/health`` answers 503). The child
exits when the parent's end of the pipe closes, so it never outlives the server; it
ignores SIGINT and SIGTERM (a Ctrl-C in a terminal reaches the whole process group, and a
service manager may signal every process of the service): the parent stops it after
finishing its requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mlxgpt_export.batching import (
    Engine,
    EngineFull,
    Job,
    check_capacity,
    check_jobs,
    check_room,
)
from mlxgpt_export.runtime import OnnxGPT

log = logging.getLogger("mlxgpt_export.engine_process")

START_TIMEOUT_S = 120.0  # loading a large export folder in the child
MESSAGES_PER_WAKEUP = 8  # the child's messages (one per step) read per event-loop turn


class EngineStopped(EngineFull):
    """The engine process has died: nothing more can be generated."""


@dataclass
class _Outbox:
    """The child's sink for one job: results go into the step's outgoing message."""

    job_id: int
    items: list[tuple[int, int | str]]

    def token(self, token_id: int) -> None:
        self.items.append((self.job_id, token_id))

    def finish(self, reason: str) -> None:
        self.items.append((self.job_id, reason))


def _child_main(folder: str, threads: int | None, max_batch: int, conn: Connection) -> None:
    """The child: load the folder, then step the engine and report, until told to stop."""
    # Ctrl-C (SIGINT) reaches a terminal's whole process group, and a service manager may
    # send SIGTERM to every process of the service: the server must first finish its
    # requests, so the child leaves both to the parent, which stops it afterwards.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        # The parent bounds the work (it counts a cancelled job out at once, the engine at
        # its next step), so the child's queue is not bounded a second time.
        engine = Engine(OnnxGPT.load(folder, threads=threads), max_batch, sys.maxsize)
    except Exception as err:  # reported to the parent, which says why it cannot serve
        conn.send(("failed", str(err)))
        return
    conn.send(("ready", None))
    outgoing: list[tuple[int, int | str]] = []
    jobs: dict[int, Job] = {}
    busy = False
    try:
        while True:
            while conn.poll(0 if busy else None):  # wait for work only when there is none
                kind, payload = conn.recv()
                busy = True  # step at least once after any message
                if kind == "stop":
                    return
                if kind == "cancel":
                    if payload in jobs:
                        engine.cancel(jobs.pop(payload))
                    continue
                new = [Job(ids, n, params, _Outbox(i, outgoing)) for i, ids, n, params in payload]
                jobs.update((job.sink.job_id, job) for job in new)
                engine.submit(new)
            busy = engine.safe_step()
            if outgoing:
                for job_id, item in outgoing:
                    if isinstance(item, str):
                        jobs.pop(job_id, None)
                conn.send(("out", outgoing, engine.load()))
                outgoing.clear()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone


class ProcessEngine:
    """:class:`Engine`'s interface, decoding in a child process (see the module docstring).

    ``model`` is the parent's copy of the export folder (its config checks prompt ids; its
    session is not used); the child loads the folder (``folder``, by default the one
    ``model`` was loaded from) itself, with ``threads`` intra-op threads.
    """

    def __init__(
        self,
        model: OnnxGPT,
        max_batch: int,
        max_queue: int,
        threads: int | None = None,
        folder: str | Path | None = None,
    ):
        check_capacity(max_batch, max_queue)
        folder = folder or model.folder
        if folder is None:
            raise ValueError(
                "the engine process needs the export folder: load the model with OnnxGPT.load"
            )
        self.model, self.folder, self.threads = model, str(folder), threads
        self.max_batch, self.max_queue = max_batch, max_queue
        self._jobs: dict[int, Job] = {}  # submitted, not finished (the event loop's thread)
        self._job_ids: dict[Job, int] = {}
        self._ids = itertools.count()
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load = {"running": 0, "waiting": 0, "peak_batch": 0}
        self.stopped: str | None = None  # why nothing can be generated any more

    # -- lifecycle ----------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the child and wait until it has loaded the model (blocking, in any thread;
        ``serve`` calls it before the event loop runs, so a failure is an error line, not
        a failed application startup). Raises :class:`EngineStopped` if it cannot."""
        if self._conn is not None:
            return
        context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        conn, child_conn = context.Pipe()
        args = (self.folder, self.threads, self.max_batch, child_conn)
        process = context.Process(target=_child_main, args=args, name="mlxgpt-engine")
        process.daemon = True
        process.start()
        child_conn.close()
        if not conn.poll(START_TIMEOUT_S):
            process.kill()
            raise EngineStopped(f"the engine process did not start in {START_TIMEOUT_S:.0f} s")
        kind, message = conn.recv()
        if kind != "ready":
            process.join()
            raise EngineStopped(f"the engine process could not load the model: {message}")
        self._conn, self._process = conn, process

    def start(self) -> None:
        """:meth:`launch` if not done yet, then hand the child's output to the running event
        loop (call in it: the app's startup)."""
        self.launch()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._receive)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the child (if it runs); jobs still unfinished end with ``"error"``."""
        if self._conn is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._conn.fileno())
            try:
                self._conn.send(("stop", None))
            except OSError:
                pass  # already gone
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._end_all("the server is shutting down")

    # -- any request (the event loop's thread) ------------------------------------------------
    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (all or none). Raises :class:`EngineFull` when there is no room."""
        check_jobs(jobs, self.model.config.vocab_size)
        if self.stopped is not None or self._conn is None:
            raise EngineStopped(self.stopped or "the engine is not running")
        check_room(len(self._jobs), len(jobs), self.max_batch + self.max_queue)
        sent = []
        for job in jobs:
            if job.max_tokens == 0:
                job.sink.finish("length")
                continue
            job_id = next(self._ids)
            self._jobs[job_id], self._job_ids[job] = job, job_id
            sent.append((job_id, list(job.context), job.max_tokens, job.params))
        if sent:
            self._send(("submit", sent))

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (its client went away): it counts no more here at once, and its slot
        is freed before the child's next step (the child, like :class:`Engine`, reports no
        finish for it; its output still under way is dropped)."""
        job.cancelled = True
        job_id = self._job_ids.pop(job, None)
        if job_id is not None:
            del self._jobs[job_id]
            self._send(("cancel", job_id))

    def load(self) -> dict[str, Any]:
        """How many jobs run and wait, and the limits (for ``/health``)."""
        waiting = min(len(self._jobs), self._load["waiting"])
        return {
            "running": len(self._jobs) - waiting,
            "waiting": waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "peak_batch": self._load["peak_batch"],
        }

    # -- internals ----------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            self._died()
            raise EngineStopped(self.stopped) from None

    def _receive(self) -> None:
        """Hand the child's output to the jobs' sinks (called by the event loop)."""
        try:
            # a few steps' messages per call: the loop must also get to writing the events
            # (the pipe stays readable, so the rest comes at its next turn)
            for _ in range(MESSAGES_PER_WAKEUP):
                if self._conn is None or not self._conn.poll():
                    break
                _, outputs, self._load = self._conn.recv()
                for job_id, item in outputs:
                    job = self._jobs.get(job_id)
                    if job is None:
                        continue
                    if isinstance(item, str):
                        del self._jobs[job_id], self._job_ids[job]
                        job.sink.finish(item)
                    else:
                        job.sink.token(item)
        except (EOFError, OSError):
            self._died()

    def _died(self) -> None:
        if self._loop is not None and self._conn is not None:
            self._loop.remove_reader(self._conn.fileno())
        code = self._process.exitcode if self._process is not None else None
        self.stopped = f"the engine process stopped (exit code {code}): restart the server"
        log.error(self.stopped)
        self._end_all(self.stopped)

    def _end_all(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why
        jobs, self._jobs, self._job_ids = list(self._jobs.values()), {}, {}
        for job in jobs:
            job.sink.finish("error")
