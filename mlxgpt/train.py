"""The training loop: next-token loss at every position, AdamW, cosine schedule, checkpoints.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows of
``block_size`` tokens. The loss is the mean cross-entropy over every position of every
window, computed in one parallel pass; the causal mask inside the model is what keeps
each position from seeing its own target.

A run is built from named steps, each usable alone:

* :func:`open_out_dir` locks the out_dir (one run at a time) and checks what it holds;
* :func:`setup` builds a :class:`Run`: corpus, tokenizer, token cache, model, optimizer
  and batch sampler, fresh, resumed from the run's checkpoint, or initialised from another
  checkpoint (``init_from``: fine-tuning);
* :func:`make_step_fn` makes one optimizer step (accumulation, clipping, update), compiled;
* :func:`evaluate` measures the train/validation loss on fixed batches;
* :func:`save` writes the checkpoint once the weights are known to be finite;
* :func:`train` runs the loop and returns a :class:`TrainResult`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map, tree_reduce
from tqdm import tqdm

from mlxgpt import __version__, kernels
from mlxgpt.checkpoint import (
    TEMP_MARKER,
    CheckpointError,
    checkpoint_copies,
    is_checkpoint_folder,
    read_config,
    read_json,
    read_tokenizer,
    read_weights,
    resolve,
)
from mlxgpt.config import (
    PRESETS_DIR,
    ConfigError,
    TrainConfig,
    load_train_config,
    merge,
    read_config_file,
    replace,
    train_config_from_dict,
)
from mlxgpt.data import Corpus, DataError, Dataset
from mlxgpt.distributed import (
    SINGLE,
    DistributedError,
    StreamSampler,
    Watchdog,
    World,
    check_same_run,
    digest,
    gather_stream_states,
    init_world,
    lost_peer,
    owned_streams,
)
from mlxgpt.errors import UserError
from mlxgpt.loss_plot import plot_losses
from mlxgpt.model import GPT
from mlxgpt.model_io import (
    load_model,
    load_optimizer_state,
    load_state,
    model_from_weights,
    save_checkpoint,
)
from mlxgpt.tokenizer import Tokenizer, TokenizerError

LOCK_FILE = ".mlxgpt-train.lock"
LOG_FILE, PLOT_FILE, CKPT_DIR, DATA_DIR = "log.jsonl", "loss.png", "ckpt", "data"

StepFn = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


class OutDirError(UserError, ValueError):
    """An out_dir that cannot be used (a file, in use, holding another run)."""


def loss_fn(model: GPT, x: mx.array, y: mx.array, mask: str = "causal") -> mx.array:
    """Mean next-token cross-entropy over all positions, computed in float32."""
    logits = model(x, mask=mask).astype(mx.float32)
    if kernels.use_cpu_forms(logits.size):  # same function, vectorisable (mlxgpt/kernels.py)
        return kernels.cross_entropy(logits, y).mean()
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW with linear warmup then cosine decay; no weight decay on biases and norms.

    Bias-corrected, as in PyTorch's ``torch.optim.AdamW`` (and so nanoGPT): MLX's AdamW
    leaves the correction off by default, which makes the first steps' updates smaller.
    """
    decay_steps = max(1, cfg.max_iters - cfg.warmup_iters)
    cosine = optim.cosine_decay(cfg.learning_rate, decay_steps, end=cfg.min_lr)
    if cfg.warmup_iters:
        warmup = optim.linear_schedule(
            cfg.learning_rate / cfg.warmup_iters, cfg.learning_rate, cfg.warmup_iters
        )
        schedule = optim.join_schedules([warmup, cosine], [cfg.warmup_iters])
    else:
        schedule = cosine

    def adamw(wd: float) -> optim.AdamW:
        return optim.AdamW(
            schedule, betas=[cfg.beta1, cfg.beta2], weight_decay=wd, bias_correction=True
        )

    return optim.MultiOptimizer(
        [adamw(cfg.weight_decay), adamw(0.0)], [lambda path, w: w.ndim >= 2]
    )


def estimate_loss(
    model: GPT,
    data: Dataset,
    cfg: TrainConfig,
    split: str,
    mask: str = "causal",
    world: World = SINGLE,
) -> float:
    """Mean loss over ``eval_iters`` batches drawn with a fixed seed (same batches each time).

    With several ranks each computes its share of the batches (batch i on rank i mod N)
    and the sum is taken over the ranks: the same mean, N times sooner.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    was_training = model.training
    model.eval()
    losses = []
    for i in range(cfg.eval_iters):
        x, y = data.batch(split, cfg.batch_size, model.config.block_size, rng)
        if i % world.size == world.rank:
            losses.append(loss_fn(model, mx.array(x), mx.array(y), mask).item())
    model.train(was_training)
    if world.size == 1:
        return float(np.mean(losses))
    return world.sum_float(sum(losses)) / cfg.eval_iters


# -- configuration --------------------------------------------------------------------------
def resolve_config(
    config_path: str | None,
    overrides: dict[str, Any],
    resume: str | None = None,
    init_from: str | None = None,
) -> TrainConfig:
    """The run's settings: a fresh config; the resumed run's own with ``overrides``, writing
    where it was pointed; or, with ``init_from``, the model shape of that checkpoint."""
    if resume is not None and init_from is not None:
        raise ConfigError(
            "--resume continues a run, --init-from starts a new one from a checkpoint's "
            "weights: pass one of them"
        )
    if init_from is not None:
        return _init_from_config(config_path, overrides, init_from)
    if resume is None:
        return load_train_config(config_path, overrides)
    ckpt = resume_checkpoint(resume)
    if not (ckpt / "train_config.json").is_file():
        raise CheckpointError(f"{ckpt} has no train_config.json: it cannot be resumed")
    saved = read_json(ckpt / "train_config.json")
    saved["stop_at"] = 0  # a resumed run goes on to max_iters unless told otherwise
    if "out_dir" not in overrides:
        own = run_dir_of(ckpt)
        if own is None:
            raise ConfigError(
                f"{ckpt} is a checkpoint folder, not a training out_dir: pass --out-dir "
                "for the continued run"
            )
        saved["out_dir"] = str(own)  # never the out_dir recorded inside: resume the copy
    try:
        return train_config_from_dict(merge(saved, overrides))
    except ConfigError as err:
        raise CheckpointError(f"cannot resume from {ckpt}: {err}") from None


def _init_from_config(
    config_path: str | None, overrides: dict[str, Any], init_from: str
) -> TrainConfig:
    """Training keys from the config and overrides; the model from the checkpoint (only
    ``model.dropout`` may change, the weights fix everything else)."""
    ckpt = resolve(init_from)
    config = read_config(ckpt)
    kind = read_tokenizer(ckpt, config).kind
    values = read_config_file(config_path or PRESETS_DIR / "tiny-char.toml")
    asked = dict(overrides.get("model") or {})
    if config_path:
        asked = {**(values.get("model") or {}), **asked}
    refused = sorted(set(asked) - {"dropout"})
    if refused:
        raise ConfigError(
            f"--init-from takes the model's shape from {ckpt}: "
            f"{', '.join('model.' + k for k in refused)} cannot change (only model.dropout can)"
        )
    if overrides.get("tokenizer", kind) != kind:
        raise ConfigError(
            f"--init-from uses the {kind} tokenizer of {ckpt}; drop tokenizer="
            f"{overrides['tokenizer']}"
        )
    values = merge(values, {k: v for k, v in overrides.items() if k != "model"})
    values["model"] = asdict(config) | ({"dropout": asked["dropout"]} if "dropout" in asked else {})
    values["tokenizer"] = kind
    return train_config_from_dict(values)


def resume_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from, or a clear error (also for a run killed before its
    first checkpoint)."""
    path = Path(path)
    try:
        return resolve(path)
    except CheckpointError:
        if (path / LOG_FILE).is_file():
            raise CheckpointError(
                f"{path} holds a run that stopped before its first checkpoint: there is "
                "nothing to resume. Start it over with --overwrite."
            ) from None
        raise


def run_dir_of(ckpt: Path) -> Path | None:
    """The out_dir a training checkpoint folder belongs to (None for a loose checkpoint)."""
    name = ckpt.name
    if name in (CKPT_DIR, f"{CKPT_DIR}.old") or name.startswith(f".{CKPT_DIR}.old-"):
        return ckpt.parent
    return None


# -- the out_dir ----------------------------------------------------------------------------
@contextmanager
def open_out_dir(out_dir: Path, continues: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``out_dir`` for one run: make it, lock it, and check what it holds.

    The lock (``flock`` on ``.mlxgpt-train.lock``) is released by the OS when the process
    ends, however it ends. A folder holding a run is used only by the run that
    ``continues`` it, or, with ``overwrite``, after that run's files are removed.
    """
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise OutDirError(f"out_dir {out_dir} is not a folder: choose another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutDirError(
            f"cannot use {out_dir} as out_dir ({err.strerror}): choose another --out-dir"
        ) from None
    try:
        _lock(fd, out_dir)
        if not continues:
            found = run_files(out_dir)
            if found and not overwrite:
                raise OutDirError(
                    f"{out_dir} already holds a training run ({', '.join(found)}): continue "
                    f"it with --resume {out_dir}, start it over with --overwrite (this "
                    "deletes its checkpoint and log), or choose another --out-dir"
                )
            if found:
                _remove_run(out_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, out_dir: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows has no MLX to train with
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        raise OutDirError(
            f"{out_dir} is in use by another `mlxgpt train` (pid {holder}): wait for it to "
            "finish, or choose another --out-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def run_files(out_dir: Path) -> list[str]:
    """What in ``out_dir`` belongs to a training run (checkpoint, log)."""
    found = [p.name + "/" for p in checkpoint_copies(out_dir / CKPT_DIR)]
    log = out_dir / LOG_FILE
    if log.is_file() and log.stat().st_size:
        found.append(LOG_FILE)
    return found


def _remove_run(out_dir: Path) -> None:
    """Delete the checkpoint (and its temporary copies) and plot of the run in ``out_dir``;
    refuse anything that is not recognisably ours. The log is replaced when the new run
    starts its own."""
    copies = checkpoint_copies(out_dir / CKPT_DIR)
    foreign = [p for p in copies if not is_checkpoint_folder(p) and not (p / TEMP_MARKER).is_file()]
    if foreign:
        raise OutDirError(
            f"{foreign[0]} is not an mlxgpt checkpoint folder: --overwrite will not delete "
            "it; move it away or choose another --out-dir"
        )
    for copy in copies:
        shutil.rmtree(copy)
    if (out_dir / PLOT_FILE).is_file():
        (out_dir / PLOT_FILE).unlink()


def start_log(log_path: Path, source: Path | None, step: int) -> None:
    """Make ``log_path`` the log of a run starting after ``step``: the records of ``source``
    up to ``step`` (none for a fresh run). Written to a temporary file and renamed over,
    so a crash at any moment leaves the old log or the new one, never a cut one."""
    fd, tmp = tempfile.mkstemp(dir=log_path.parent, prefix=f".{log_path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if step > 0 and source is not None and source.is_file():
                _copy_records(source, out, step)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, log_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_records(source: Path, out: TextIO, step: int) -> None:
    """Copy the JSON records of ``source`` with ``step`` <= ``step`` (streamed)."""
    with open(source, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                if record["step"] <= step:
                    out.write(json.dumps(record) + "\n")


# -- setup ----------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run works with; ``step`` and ``best_val`` advance."""

    cfg: TrainConfig
    out_dir: Path
    model: GPT
    tokenizer: Tokenizer
    data: Dataset
    sampler: StreamSampler
    optimizer: optim.Optimizer
    step: int = 0
    best_val: float = math.inf
    init_from: Path | None = None
    world: World = SINGLE  # this process's rank among the ranks of the run

    @property
    def last_step(self) -> int:
        """The step this invocation stops at (``stop_at`` or ``max_iters``)."""
        cfg = self.cfg
        return cfg.stop_at if 0 < cfg.stop_at < cfg.max_iters else cfg.max_iters

    @property
    def mask(self) -> str:
        return "causal" if self.cfg.causal_mask else "none"


def setup(
    cfg: TrainConfig,
    resume: Path | None = None,
    init_from: Path | None = None,
    corpus: Corpus | None = None,
    world: World = SINGLE,
) -> Run:
    """Build the run: from scratch, from the checkpoint ``resume`` (same run, same batches),
    or from the weights, model config and tokenizer of ``init_from`` (a new run). Call it
    inside :func:`open_out_dir` (it writes the token cache into the out_dir)."""
    out_dir = Path(cfg.out_dir)
    corpus = corpus or Corpus(cfg.data)
    corpus.fingerprint()  # reads and checks every file once
    mx.random.seed(cfg.seed)
    model, tokenizer = _model_and_tokenizer(cfg, corpus, resume, init_from)
    n_streams = data_streams(cfg, resume, world)
    cfg = replace(cfg, model=model.config, data_streams=n_streams)
    if not world.is_main:
        world.barrier()  # rank 0 holds the out_dir and writes the token cache first
    try:
        data = Dataset.prepare(
            corpus,
            tokenizer,
            out_dir / DATA_DIR,
            cfg.val_fraction,
            cfg.model.block_size,
            clean_stale=world.is_main,  # rank 0 holds the out_dir's lock
        )
    except TokenizerError as err:
        raise DataError(
            f"{corpus.path} cannot be encoded with the tokenizer of {resume or init_from}: {err}"
        ) from None
    if world.is_main:
        world.barrier()
    if cfg.dtype == "bfloat16":
        model.set_dtype(mx.bfloat16)
    model.train()
    model.update(world.broadcast(model.parameters()))  # identical replicas, whatever the RNG
    mx.eval(model.parameters())  # now, on every rank: a collective must not wait
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    streams = owned_streams(n_streams, world)
    sampler = StreamSampler(data, cfg.batch_size, cfg.model.block_size, cfg.seed, streams)
    run = Run(
        cfg, out_dir, model, tokenizer, data, sampler, optimizer, init_from=init_from, world=world
    )
    if resume is not None:
        _restore(run, resume)
    check_same_run(
        world,
        step=run.step,
        config=digest(cfg.to_dict()),
        data=digest(data.meta),
        mlxgpt=__version__,
        mlx=mx.__version__,
    )
    return run


def data_streams(cfg: TrainConfig, resume: Path | None, world: World) -> int:
    """How many data streams the run draws from: fixed by the checkpoint when resuming
    (its ``data_streams`` states, or its one ``data_rng``), else ``cfg.data_streams`` or
    one per rank. Every rank must own as many of them (:func:`owned_streams` checks)."""
    if resume is None:
        return cfg.data_streams or world.size
    saved = len(_stream_states(load_state(resume), resume))
    if cfg.data_streams not in (0, saved):
        raise DistributedError(
            f"the run in {resume} draws from {saved} data stream(s); data_streams cannot "
            f"change when resuming (drop data_streams={cfg.data_streams})"
        )
    return saved


def _stream_states(state: dict[str, Any], ckpt: Path) -> list[Any]:
    """The saved generator states of every data stream (one ``data_rng`` in a run of one
    stream)."""
    streams = state.get("data_streams", [state["data_rng"]])
    if not isinstance(streams, list) or not streams:
        raise CheckpointError(f"{ckpt / 'state.json'}: 'data_streams' must be a list of states")
    return streams


def _model_and_tokenizer(
    cfg: TrainConfig, corpus: Corpus, resume: Path | None, init_from: Path | None
) -> tuple[GPT, Tokenizer]:
    """The checkpoint's (resume, init_from) or new ones (tokenizer trained on the corpus)."""
    if resume is not None:
        model, tokenizer, _ = load_model(resume)
        if model.config != replace(cfg.model, vocab_size=model.config.vocab_size):
            raise CheckpointError(
                f"model settings differ from the checkpoint's ({model.config}); "
                "a resumed run keeps its model shape"
            )
        return model, tokenizer
    if init_from is not None:
        config = read_config(init_from)
        weights = read_weights(init_from, config)
        tokenizer = read_tokenizer(init_from, config)
        return model_from_weights(replace(config, dropout=cfg.model.dropout), weights), tokenizer
    if cfg.tokenizer == "char":
        tokenizer = Tokenizer.train_char(corpus.pieces())
    else:
        tokenizer = Tokenizer.train_bpe(corpus.pieces(), cfg.bpe_vocab_size)
    return GPT(replace(cfg.model, vocab_size=tokenizer.vocab_size)), tokenizer


def _restore(run: Run, ckpt: Path) -> None:
    """Continue where ``ckpt`` stopped: optimizer, data sampler, step, best loss."""
    state = load_state(ckpt)
    load_optimizer_state(ckpt, run.optimizer)
    try:
        run.sampler.set_states(_stream_states(state, ckpt))
    except ValueError as err:
        raise CheckpointError(f"{ckpt / 'state.json'}: 'data_rng' is invalid ({err})") from None
    run.step = state["step"]
    run.best_val = float(state.get("best_val_loss", math.inf))
    if run.step >= run.last_step:
        cfg = run.cfg
        what = f"stop_at={cfg.stop_at}" if cfg.stop_at else f"max_iters={cfg.max_iters}"
        raise ConfigError(
            f"the run in {ckpt} is already at step {run.step}, {what}: nothing to train. "
            f"To train on, resume with a larger max_iters, e.g. `mlxgpt train --resume "
            f"{run.out_dir} max_iters={max(run.step, cfg.max_iters) * 2}`"
        )


# -- one optimizer step ---------------------------------------------------------------------
def accumulate_gradients(
    loss_and_grad: Callable, model: GPT, x: mx.array, y: mx.array
) -> tuple[mx.array, Any]:
    """Mean loss and mean gradients over the micro-batches stacked on axis 0 of x, y."""
    total_loss, grads = None, None
    for i in range(x.shape[0]):
        loss, g = loss_and_grad(model, x[i], y[i])
        total_loss = loss if total_loss is None else total_loss + loss
        grads = g if grads is None else tree_map(mx.add, grads, g)
    n = x.shape[0]
    return total_loss / n, tree_map(lambda g: g / n, grads)


def clip_gradients(grads: Any, max_norm: float) -> tuple[Any, mx.array]:
    """The gradients scaled to global norm <= ``max_norm`` (0: unchanged), and their global
    norm before clipping (logged either way)."""
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    squares = tree_reduce(lambda acc, g: acc + g.astype(mx.float32).square().sum(), grads, 0.0)
    return grads, mx.sqrt(squares)


def make_step_fn(
    model: GPT, optimizer: optim.Optimizer, cfg: TrainConfig, world: World = SINGLE
) -> StepFn:
    """``step(x, y) -> (loss, grad_norm)``: one optimizer step over ``x, y`` of shape
    ``(grad_accum, batch_size, block_size)``, compiled with ``mx.compile`` when
    ``cfg.compile`` (model, optimizer and random state are the compiled function's state).
    With several ranks the gradients and the loss are averaged over the ranks inside the
    step (one all-reduce of all gradients), so every rank applies the same update.
    """
    mask = "causal" if cfg.causal_mask else "none"
    loss_and_grad = nn.value_and_grad(model, partial(loss_fn, mask=mask))

    def step(x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        loss, grads = accumulate_gradients(loss_and_grad, model, x, y)
        grads = world.average_gradients(grads)
        grads, norm = clip_gradients(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return world.mean(loss), norm

    if cfg.compile:
        state = [model.state, optimizer.state, mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)
    return step


# -- evaluation and checkpoints -------------------------------------------------------------
def evaluate(run: Run) -> tuple[float, float]:
    """Train and validation loss over ``eval_iters`` fixed batches each."""
    return (
        estimate_loss(run.model, run.data, run.cfg, "train", world=run.world),
        estimate_loss(run.model, run.data, run.cfg, "val", world=run.world),
    )


def _diverged(run: Run, what: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"{what}; training stopped. The last good checkpoint in {run.out_dir / CKPT_DIR} is "
        f"intact. Try a lower learning_rate (now {run.cfg.learning_rate}) or grad_clip=1.0."
    )


def save(run: Run, probe: tuple[mx.array, mx.array], streams: list[Any] | None = None) -> Path:
    """Save the checkpoint, unless the current weights already give a NaN/inf loss on
    ``probe`` (then the last good checkpoint stays). ``streams``: every data stream's
    state, gathered from the ranks (default: this process's own)."""
    probe_loss = loss_fn(run.model, *probe, mask=run.mask).item()
    if not math.isfinite(probe_loss):
        raise _diverged(run, f"the weights after step {run.step} give a {probe_loss} loss")
    streams = streams or gather_stream_states(run.sampler, SINGLE)
    state: dict[str, Any] = {
        "step": run.step,
        "best_val_loss": run.best_val,
        "data_rng": streams[0],
    }
    if len(streams) > 1:
        state["data_streams"] = streams
    if run.init_from is not None:
        state["init_from"] = str(run.init_from)
    return save_checkpoint(
        run.out_dir / CKPT_DIR,
        run.model,
        run.tokenizer,
        train_config=run.cfg.to_dict(),
        optimizer=run.optimizer,
        state=state,
        clean_stale=True,  # we hold the out_dir's lock
    )


# -- the loop -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` did: where it wrote, the losses, and the live objects."""

    out_dir: Path
    ckpt: Path
    loss_png: Path
    start_step: int
    step: int
    elapsed_s: float
    losses: list[float]  # per step of this invocation
    train_loss: float  # at the last evaluation
    val_loss: float
    best_val_loss: float
    config: TrainConfig
    model: GPT = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    data: Dataset = field(repr=False)
    rank: int = 0  # in a distributed run; only rank 0 prints and writes


def train(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> TrainResult:
    """Run training into ``cfg.out_dir``: fresh, continuing the checkpoint ``resume``, or
    fine-tuning from the checkpoint ``init_from`` (never written to). An out_dir holding
    another run is refused unless ``overwrite``."""
    out_dir = Path(cfg.out_dir)
    resume_ckpt = resume_checkpoint(resume) if resume is not None else None
    init_ckpt = resolve(init_from) if init_from is not None else None
    source = resume_ckpt or init_ckpt
    if source is not None:
        _check_apart(out_dir, source, resume_ckpt is not None)
    own = resume_ckpt is not None and _same(run_dir_of(resume_ckpt), out_dir)
    corpus = Corpus(cfg.data)
    corpus.fingerprint()  # bad data is an error before anything is written
    world = init_world(cfg.dist_timeout)
    if world.size > 1:
        return _train_ranks(cfg, world, resume_ckpt, init_ckpt, corpus, overwrite, progress, quiet)
    with open_out_dir(out_dir, continues=own, overwrite=overwrite):
        run = setup(cfg, resume_ckpt, init_ckpt, corpus)
        source_dir = run_dir_of(resume_ckpt) if resume_ckpt is not None else None
        start_log(out_dir / LOG_FILE, source_dir and source_dir / LOG_FILE, run.step)
        return _loop(run, progress, quiet)


def _train_ranks(
    cfg: TrainConfig,
    world: World,
    resume: Path | None,
    init_from: Path | None,
    corpus: Corpus,
    overwrite: bool,
    progress: bool,
    quiet: bool,
) -> TrainResult:
    """:func:`train` as one rank of a data-parallel run (see :mod:`mlxgpt.distributed`):
    rank 0 holds the out_dir and alone prints, logs and saves; a lost or hung peer ends
    the rank with a :class:`DistributedError` saying how to resume."""
    out_dir = Path(cfg.out_dir)
    hint = (
        f"To continue from the last checkpoint, run the same mlx.launch command with "
        f"--resume {out_dir} (on every machine, OUT_DIR/ckpt must be that checkpoint)."
    )
    own = resume is not None and _same(run_dir_of(resume), out_dir)
    hold = open_out_dir(out_dir, own, overwrite) if world.is_main else nullcontext()
    with Watchdog(world, cfg.dist_timeout, hint) as watchdog, hold:
        try:
            run = setup(cfg, resume, init_from, corpus, world)
            if world.is_main:
                source_dir = run_dir_of(resume) if resume is not None else None
                start_log(out_dir / LOG_FILE, source_dir and source_dir / LOG_FILE, run.step)
            return _loop(run, progress and world.is_main, quiet or not world.is_main, watchdog.beat)
        except RuntimeError as err:
            converted = lost_peer(err, world, watchdog.what, hint)
            if converted is err:
                raise
            raise converted from None


def _same(a: Path | None, b: Path) -> bool:
    return a is not None and a.resolve() == b.resolve()


def _check_apart(out_dir: Path, source: Path, resuming: bool) -> None:
    """A checkpoint a run starts from is never written to: out_dir must not contain it
    (except a run's own checkpoint, which it continues) nor lie inside it."""
    out_abs, src_abs = out_dir.resolve(), source.resolve()
    inside = src_abs == out_abs or out_abs in src_abs.parents or src_abs in out_abs.parents
    if inside and not (resuming and _same(run_dir_of(source), out_dir)):
        raise OutDirError(
            f"out_dir {out_dir} and the checkpoint {source} overlap: the run would write "
            "into the checkpoint it starts from. Choose another --out-dir."
        )


def train_step(run: Run, step_fn: StepFn) -> tuple[dict[str, Any], tuple[mx.array, mx.array]]:
    """Draw a batch, take one optimizer step, advance ``run.step``: the step's log record
    and one micro-batch (to probe the weights before a checkpoint)."""
    cfg = run.cfg
    t0 = time.perf_counter()
    x, y = (mx.array(a) for a in run.sampler.next(cfg.grad_accum))
    # dropout noise: the step's (and the rank's) own
    mx.random.seed((cfg.seed * 1_000_003 + run.step) * run.world.size + run.world.rank)
    loss, norm = step_fn(x, y)
    mx.eval(loss, norm, run.model.state, run.optimizer.state, mx.random.state)
    lr = run.optimizer.learning_rate.item()  # the rate this step used
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise _diverged(run, f"loss became {loss_value} at step {run.step + 1}")
    run.step += 1
    tokens = run.world.size * x.size  # every rank's windows
    record = {
        "step": run.step,
        "loss": loss_value,
        "lr": lr,
        "grad_norm": norm.item(),
        "tokens_per_s": tokens / (time.perf_counter() - t0),
    }
    return record, (x[0], y[0])


def _loop(
    run: Run, progress: bool, quiet: bool, beat: Callable[[str], None] = lambda what: None
) -> TrainResult:
    """Train to ``run.last_step``; ``beat`` tells a distributed run's watchdog each time
    the run moves on."""
    cfg, out_dir, world = run.cfg, run.out_dir, run.world
    step_fn = make_step_fn(run.model, run.optimizer, cfg, world)
    if kernels.use_cpu_forms():
        # MLX's CPU allocator keeps only 32 MB of freed buffers for reuse; a step frees far
        # more, and each buffer handed back to the OS page-faults in again the next step.
        mx.set_cache_limit(mx.get_memory_limit())
    last, start_step = run.last_step, run.step
    if not quiet:
        _describe(run)
    losses: list[float] = []
    train_loss = val_loss = math.nan
    bar = tqdm(total=last, initial=run.step, disable=not progress, unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    log_path = out_dir / LOG_FILE if world.is_main else os.devnull  # rank 0 logs
    with open(log_path, "a", encoding="utf-8") as log, bar:
        while run.step < last:
            beat(f"step {run.step + 1}")
            record, probe = train_step(run, step_fn)
            losses.append(record["loss"])
            _write(log, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            bar.update(1)
            if run.step % cfg.eval_interval == 0 or run.step == last:
                beat(f"the evaluation at step {run.step}")
                train_loss, val_loss = evaluate(run)
                run.best_val = min(run.best_val, val_loss)
                _write(log, {"step": run.step, "train_loss": train_loss, "val_loss": val_loss})
                if not quiet:
                    bar.write(
                        f"step {run.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
                    )
            if run.step % cfg.ckpt_interval == 0 or run.step == last:
                beat(f"the checkpoint at step {run.step}")
                streams = gather_stream_states(run.sampler, world)  # every rank takes part
                if world.is_main:
                    save(run, probe, streams)
    elapsed = time.perf_counter() - t_start
    png = out_dir / PLOT_FILE
    if world.is_main:
        png = plot_losses(out_dir / LOG_FILE, png, f"mlxgpt training — {out_dir.name}")
    return TrainResult(
        out_dir=out_dir,
        ckpt=out_dir / CKPT_DIR,
        loss_png=png,
        start_step=start_step,
        step=run.step,
        elapsed_s=elapsed,
        losses=losses,
        train_loss=train_loss,
        val_loss=val_loss,
        best_val_loss=run.best_val,
        config=cfg,
        model=run.model,
        tokenizer=run.tokenizer,
        data=run.data,
        rank=world.rank,
    )


def _write(log: TextIO, record: dict[str, Any]) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def _describe(run: Run) -> None:
    cfg, m = run.cfg, run.cfg.model
    tokens_per_step = cfg.data_streams * cfg.batch_size * cfg.grad_accum * m.block_size
    origin = f" (from {run.init_from})" if run.init_from else ""
    if run.world.size > 1:
        print(f"data parallel: {run.world.size} ranks, {cfg.data_streams} data streams")
    print(
        f"model: {run.model.num_params() / 1e6:.2f}M parameters (excluding position "
        f"embeddings), {m.n_layer} layers x {m.n_head} heads x {m.n_embd} wide, context "
        f"{m.block_size}, vocab {run.tokenizer.vocab_size} ({run.tokenizer.kind}){origin}"
    )
    print(
        f"data: {run.data.meta['train_tokens']:,} train / {run.data.meta['val_tokens']:,} val "
        f"tokens; {tokens_per_step:,} tokens per step; steps {run.step} -> {run.last_step} "
        f"of {cfg.max_iters}"
    )
    if run.step:
        print(f"resuming at step {run.step}")
