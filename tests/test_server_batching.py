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
# A live row holds at most block_size tokens and fewer than a quarter of the width is left
# untrimmed, so the width is under 4/3 block_size before a decode step adds a column.
MAX_WIDTH = CONFIG.block_size * 4 // 3 + 1


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
    assert max(widths) <= MAX_WIDTH  # unused leading columns are trimmed
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


def check_batch(engine: Engine) -> None:
    """The batch's invariants after a step (every row finite, positions in the window)."""
    batch = engine._batch
    if batch is None:
        return
    assert len(batch.jobs) <= engine.max_batch and batch.width <= MAX_WIDTH
    assert np.isfinite(batch.logits).all()  # free slots too: they are decoded
    assert (np.diff(batch.mask, axis=1) >= 0).all()  # left padding, then real tokens
    assert batch.mask[:, -1].all()  # no mask row is all zeros
    for row, j in enumerate(batch.jobs):
        if j is not None:  # as many real tokens as its window: positions as alone
            assert batch.mask[row].sum() == len(j.context) <= CONFIG.block_size


def drive(engine: Engine) -> None:
    """Step until idle, checking the batch after every step."""
    while engine.step():
        check_batch(engine)


def test_free_slots_are_reused_and_jobs_still_get_their_tokens_alone(model: OnnxGPT):
    engine = Engine(model, max_batch=4, max_queue=40)
    rng = np.random.default_rng(4)
    long = job(rng.integers(0, CONFIG.vocab_size, 24).tolist(), 60, SamplingParams(seed=9))
    jobs = [long]
    for i in range(30):  # staggered budgets; often several finish (and join) in one step
        prompt = rng.integers(0, CONFIG.vocab_size, [1, 4, 11, 19][i % 4]).tolist()
        params = SamplingParams(temperature=[0.0, 0.8, 1.2][i % 3], top_k=[0, 6][i % 2], seed=i)
        jobs.append(job(prompt, [2, 2, 5, 9, 3][i % 5], params))
    joiners = []
    join = engine._join
    engine._join = lambda new: (joiners.append(len(new.jobs)), join(new))[1]
    engine.submit(jobs)
    drive(engine)
    for j in jobs:
        assert j.sink.tokens == alone(model, j) and j.sink.reason == "length"
    assert engine.stats["slot_reuses"] >= 25 and engine.stats["merges"] <= 2
    assert max(joiners) >= 2  # joiners of different lengths shared a prefill
    assert engine.load()["running"] == 0 and engine.load()["peak_batch"] == 4


def test_a_joiner_wider_than_the_batch_is_merged_and_free_slots_dropped(model: OnnxGPT):
    engine = Engine(model, max_batch=4, max_queue=4)
    params = SamplingParams(temperature=0.9, seed=3)
    running = [job([1, 2], 20, params), job([3, 4], 2, params), job([5, 6], 2, params)]
    running.append(job([7, 8], 20, params))
    engine.submit(running)
    for _ in range(3):  # the two short ones finish: two free slots in a 5-column batch
        engine.step()
    assert engine._batch.free() == [1, 2] and engine._batch.width == 5
    wide = job(list(range(25)), 6, SamplingParams(temperature=0.0))
    engine.submit([wide])
    engine.step()
    check_batch(engine)
    assert engine.stats == {"slot_reuses": 0, "merges": 1, "compactions": 0, "trims": 0}
    assert engine._batch.jobs == [running[0], running[3], wide]  # live rows, the joiner
    drive(engine)
    for j in [*running, wide]:
        assert j.sink.tokens == alone(model, j)


def test_a_cancelled_rows_slot_is_reused_by_the_next_job(model: OnnxGPT):
    engine = Engine(model, max_batch=3, max_queue=2)
    params = SamplingParams(temperature=1.1, top_p=0.9, seed=8)
    running = [job([5, 6, 7, 8], 25, params) for _ in range(3)]
    engine.submit(running)
    for _ in range(4):
        engine.step()
    engine.cancel(running[1])
    engine.step()  # the cancelled row is decoded as a free slot: finite, never sent
    check_batch(engine)
    assert engine._batch.free() == [1] and engine.load()["running"] == 2
    produced = len(running[1].sink.tokens)
    late = job([9, 10], 12, SamplingParams(temperature=0.7, seed=2))
    engine.submit([late])
    engine.step()
    assert engine._batch.jobs == [running[0], late, running[2]]  # in place: no copy
    assert engine.stats["slot_reuses"] == 1 and engine.stats["merges"] == 0
    drive(engine)
    assert len(running[1].sink.tokens) == produced and running[1].sink.reason is None
    for j in (running[0], running[2], late):
        assert j.sink.tokens == alone(model, j)


def test_rows_slide_their_window_while_others_reuse_slots(model: OnnxGPT):
    engine = Engine(model, max_batch=4, max_queue=20)
    rng = np.random.default_rng(6)
    sliding = [
        job(rng.integers(0, CONFIG.vocab_size, 30).tolist(), 45, SamplingParams(seed=1)),
        job(rng.integers(0, CONFIG.vocab_size, 32).tolist(), 40, SamplingParams(0.0)),
    ]
    short = [
        job(rng.integers(0, CONFIG.vocab_size, 1 + i % 7).tolist(), 3 + i % 4,
            SamplingParams(temperature=0.8, seed=20 + i))
        for i in range(16)
    ]  # fmt: skip
    slotted = []  # the sliding jobs each time they re-joined into a free slot
    join = engine._join

    def spy(new) -> None:
        reused = engine.stats["slot_reuses"]
        join(new)
        if engine.stats["slot_reuses"] > reused:
            slotted.extend(j for j in new.jobs if j in sliding)

    engine._join = spy
    engine.submit(sliding + short)
    drive(engine)
    for j in sliding + short:
        assert j.sink.tokens == alone(model, j)
    assert set(slotted) == set(sliding) and len(slotted) >= 20
    assert engine.stats["merges"] == 0


def test_the_batch_is_compacted_when_most_rows_are_free(model: OnnxGPT):
    engine = Engine(model, max_batch=6, max_queue=0)
    params = SamplingParams(temperature=0.8, seed=4)
    jobs = [job([1 + i, 2], 3 if i < 4 else 12, params) for i in range(6)]
    engine.submit(jobs)
    for _ in range(3):  # four finish at the third step: their rows are free
        engine.step()
    assert len(engine._batch.free()) == 4 and engine.stats["compactions"] == 0
    engine.step()
    check_batch(engine)
    assert engine.stats["compactions"] == 1 and engine._batch.jobs == jobs[4:]
    drive(engine)
    assert engine._batch is None and engine.stats["compactions"] == 1
    for j in jobs:
        assert j.sink.tokens == alone(model, j)
