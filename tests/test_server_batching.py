"""The continuous-batching engine (no HTTP): every job gets exactly the tokens it gets alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_export_support import CONFIGS, write_random_checkpoint

from mlxgpt.sampling import SamplingParams
from mlxgpt_export.batching import Engine, EngineFull, Job
from mlxgpt_export.errors import InputError
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import OnnxGPT

CONFIG = CONFIGS["bias-4layer-hs7-gelutanh"]  # vocab 47, context 32


class Recorder:
    """A sink that keeps what the engine sends."""

    def __init__(self):
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()

    def token(self, token_id: int) -> None:
        assert self.reason is None, "a token after finish"
        self.tokens.append(token_id)

    def finish(self, reason: str) -> None:
        assert self.reason is None, "finished twice"
        self.reason = reason
        self.done.set()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> OnnxGPT:
    tmp = tmp_path_factory.mktemp("batching")
    ckpt = write_random_checkpoint(tmp / "ckpt", CONFIG, seed=3)
    return OnnxGPT.load(export_checkpoint(ckpt, tmp / "export", quiet=True, verify=False))


def job(prompt: list[int], max_tokens: int, params: SamplingParams) -> Job:
    return Job(prompt, max_tokens, params, Recorder())


def alone(model: OnnxGPT, j: Job) -> list[int]:
    """What the runtime generates for this job by itself (no batch; stops at model.eos_id)."""
    return list(model.generate_ids(j.prompt_ids, j.max_tokens, j.params))


def mixed_jobs(n: int, seed: int = 0) -> list[Job]:
    """Different prompt lengths (some longer than the window), settings, seeds and budgets."""
    rng = np.random.default_rng(seed)
    settings = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.0, top_k=5, seed=2),
        SamplingParams(temperature=0.9, top_p=0.8, seed=3),
        SamplingParams(temperature=1.3, top_k=10, top_p=0.95),
    ]
    jobs = []
    for i in range(n):
        length = int(rng.choice([1, 3, 9, 20, 31, 32, 45]))
        prompt = rng.integers(0, CONFIG.vocab_size, length).tolist()
        params = settings[i % len(settings)]
        if params.seed is None:
            params = SamplingParams(params.temperature, params.top_k, params.top_p, seed=100 + i)
        budget = int(rng.choice([0, 1, 5, 17, 40, 70]))  # 40 and 70 outgrow the 32-token window
        jobs.append(job(prompt, budget, params))
    return jobs


def test_jobs_joining_at_different_steps_get_their_tokens_alone(model: OnnxGPT):
    engine = Engine(model, max_batch=6, max_queue=40)
    jobs = mixed_jobs(24)
    widths = []
    for start in range(0, len(jobs), 3):  # three more join every few steps
        engine.submit(jobs[start : start + 3])
        for _ in range(start % 4 + 1):
            engine.step()
            if engine._batch is not None:
                widths.append(engine._batch.mask.shape[1])
                assert len(engine._batch.jobs) <= 6
    engine.run_until_idle()
    for j in jobs:
        expected = alone(model, j)
        assert j.sink.tokens == expected
        assert j.sink.reason == "length"
    assert max(widths) <= CONFIG.block_size  # the cache is trimmed: never wider than the window
    assert engine.load() == {
        "running": 0, "waiting": 0, "max_batch": 6, "max_queue": 40, "peak_batch": 6
    }  # fmt: skip


def test_end_of_text_token_finishes_a_row_with_stop(model: OnnxGPT, monkeypatch):
    jobs = mixed_jobs(8, seed=1)
    free = [alone(model, j) for j in jobs]
    stop = next(tokens[3] for tokens in free if len(tokens) > 3)
    monkeypatch.setattr(OnnxGPT, "eos_id", property(lambda self: stop))
    engine = Engine(model, max_batch=4, max_queue=4)
    engine.submit(jobs)
    engine.run_until_idle()
    stopped = 0
    for j, tokens in zip(jobs, free, strict=True):
        assert j.sink.tokens == alone(model, j)  # now stops at `stop`
        assert j.sink.reason == ("stop" if stop in tokens else "length")
        stopped += stop in tokens
    assert stopped >= 1


def test_queue_is_bounded_and_cancelled_jobs_free_their_slot(model: OnnxGPT):
    engine = Engine(model, max_batch=2, max_queue=1)
    params = SamplingParams(temperature=0.8, seed=5)
    running = [job([1, 2, 3], 50, params) for _ in range(2)]
    queued = job([4], 50, params)
    engine.submit(running)
    engine.step()
    engine.submit([queued])
    with pytest.raises(EngineFull, match="retry later"):
        engine.submit([job([5], 5, params)])
    with pytest.raises(EngineFull):  # all or none
        engine.submit([job([5], 5, params), job([6], 5, params)])
    assert engine.load()["running"] == 2 and engine.load()["waiting"] == 1
    engine.cancel(running[0])
    engine.step()
    assert engine.load()["running"] == 2 and engine.load()["waiting"] == 0  # queued one joined
    produced = len(running[0].sink.tokens)
    extra = job([5], 5, params)
    engine.submit([extra])  # the cancelled row's room is free again
    engine.run_until_idle()
    assert len(running[0].sink.tokens) == produced and running[0].sink.reason is None
    for j in (running[1], queued, extra):
        assert j.sink.tokens == alone(model, j)


def test_max_tokens_zero_finishes_at_once_and_bad_jobs_are_refused(model: OnnxGPT):
    engine = Engine(model, max_batch=1, max_queue=0)
    empty = job([1], 0, SamplingParams())
    engine.submit([empty])
    assert empty.sink.reason == "length" and empty.sink.tokens == []
    assert engine.step() is False
    with pytest.raises(InputError, match="out of range"):
        engine.submit([job([CONFIG.vocab_size], 3, SamplingParams())])
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.submit([job([], 3, SamplingParams())])
    assert engine.load()["running"] == 0


def test_background_thread_serves_jobs_submitted_from_other_threads(model: OnnxGPT):
    engine = Engine(model, max_batch=4, max_queue=16)
    engine.start()
    try:
        jobs = mixed_jobs(12, seed=2)
        threads = [threading.Thread(target=engine.submit, args=([j],)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for j in jobs:
            assert j.sink.done.wait(60)
            assert j.sink.tokens == alone(model, j)
    finally:
        engine.stop()
    with pytest.raises(EngineFull, match="shutting down"):
        engine.submit([job([1], 3, SamplingParams())])


def test_stop_ends_unfinished_jobs_with_error(model: OnnxGPT):
    engine = Engine(model, max_batch=1, max_queue=2)
    jobs = [job([1, 2], 30, SamplingParams()) for _ in range(3)]
    engine.submit(jobs)
    engine.step()
    engine.stop()
    assert [j.sink.reason for j in jobs] == ["error"] * 3
    assert engine.load()["running"] == 0 and engine.load()["waiting"] == 0
