"""Model and training configuration: dataclasses, preset files and command-line overrides.

Like nanoGPT's config files, a training run is described by a small TOML (or JSON) file
whose keys are the fields of :class:`TrainConfig` plus a ``[model]`` table with the fields
of :class:`GPTConfig`. ``key=value`` overrides from the command line are applied on top.
Unknown keys and values of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlxgpt.errors import UserError
from mlxgpt.sampling import check_seed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PRESETS_DIR = Path(__file__).parent / "presets"
ACTIVATIONS = ("gelu", "gelu_tanh")  # exact GELU; GPT-2's tanh approximation
LAYER_NORM_EPS = 1e-5  # every LayerNorm: the MLX model, the ONNX graph, the numpy reference


class ConfigError(UserError, ValueError):
    """A configuration problem the user can fix; the message says how."""


@dataclass
class GPTConfig:
    """Shape of the network; saved as ``config.json`` beside the weights."""

    vocab_size: int = 65
    block_size: int = 64  # context window in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # MLP activation: "gelu" (exact, erf) or "gelu_tanh" (the tanh approximation GPT-2
    # was trained with; Hugging Face's "gelu_new")
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model shape."""

    data: str = "data/tinyshakespeare.txt"  # a .txt file or a folder of .txt files
    out_dir: str = "out/tiny-char"
    tokenizer: str = "char"  # "char" or "bpe"
    bpe_vocab_size: int = 512  # only for tokenizer = "bpe"
    val_fraction: float = 0.1
    seed: int = 1337
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 1000
    stop_at: int = 0  # stop (with a checkpoint) at this step without changing the schedule
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 200
    eval_iters: int = 20
    ckpt_interval: int = 500
    dtype: str = "float32"  # or "bfloat16" (GPU): parameters/activations; loss stays float32
    compile: bool = True
    causal_mask: bool = True  # False is the "cheating" teaching device, never for real use
    sample_tokens: int = 200  # length of the sample printed at the end
    sample_temperature: float = 0.8  # its temperature (0 = greedy)
    # data-parallel runs (mlx.launch; README "Training on several machines"): batch_size
    # windows per data stream; 0 streams = one per rank; seconds a rank waits for the others
    data_streams: int = 0
    dist_timeout: float = 300.0
    model: GPTConfig = field(default_factory=GPTConfig)

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters")
        for name in positive + ("ckpt_interval", "bpe_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_iters", "stop_at", "sample_tokens", "data_streams"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "sample_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate == 0:
            raise ConfigError("learning_rate must be > 0")
        if not self.dist_timeout > 0:
            raise ConfigError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.warmup_iters > self.max_iters:
            raise ConfigError(
                f"warmup_iters ({self.warmup_iters}) must not exceed max_iters ({self.max_iters})"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.stop_at > self.max_iters:
            raise ConfigError(
                f"stop_at ({self.stop_at}) is after max_iters ({self.max_iters}), where training "
                "ends anyway: use a stop_at <= max_iters (0 = off), or raise max_iters"
            )
        for name in ("data", "out_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(
                    f"{name} is empty: give a path, e.g. {name}={getattr(TrainConfig, name)}"
                )
        check_seed(self.seed, "seed", ConfigError)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Convert ``value`` (from TOML/JSON or a CLI string) to the field's declared type."""
    kind = annotation.replace(" ", "")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if result != result or result in (float("inf"), float("-inf")):
                raise ValueError
            return result
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported field type {annotation}")
    raise ConfigError(f"{name} expects a {kind}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(
            f"unknown config key(s): {names}. Known keys: " + ", ".join(prefix + k for k in known)
        )
    kwargs = {}
    for key, value in values.items():
        f = known[key]
        if f.name == "model":
            if not isinstance(value, dict):
                raise ConfigError("'model' must be a table of model settings")
            kwargs[key] = _build(GPTConfig, value, "model.")
        else:
            kwargs[key] = _coerce(prefix + key, value, str(f.type))
    return cls(**kwargs)


def gpt_config_from_dict(values: dict[str, Any]) -> GPTConfig:
    return _build(GPTConfig, values, "model.")


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        preset = PRESETS_DIR / f"{path.name}.toml"
        if preset.is_file():
            path = preset
        else:
            names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
            raise ConfigError(f"config file {path} not found (built-in presets: {names})")
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML/JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold settings by name (a JSON object such as "
            f'{{"max_iters": 500}}), not a {type(values).__name__}'
        )
    return values


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["max_iters=100", "model.n_layer=2"]`` -> nested dict (strings, coerced later).

    A key given both a value and sub-keys (``model=3 model.n_layer=2``) is an error.
    """
    result: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. max_iters=100)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key name (e.g. model.n_layer=2)")
        result = merge(result, _nest(parts, value.strip()))
    return result


def _nest(parts: list[str], value: Any) -> Any:
    for part in reversed(parts):
        value = {part: value}
    return value


def merge(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``extra``'s settings over ``base``'s, table by table.

    A key that is a value on one side and a table on the other (``model=3`` and
    ``model.n_layer=2``) is a :class:`ConfigError`, not a crash or a silent choice.
    """
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = merge(old, value, f"{prefix}{key}.")
        elif key in out and isinstance(value, dict) != isinstance(old, dict):
            table, plain = (old, value) if isinstance(old, dict) else (value, old)
            sub = ", ".join(f"{prefix}{key}.{k}" for k in table)
            raise ConfigError(
                f"{prefix}{key} is given a value ({prefix}{key}={plain}) and settings inside "
                f"it ({sub}): set one or the other"
            )
        else:
            out[key] = value
    return out


def load_train_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The default preset (``tiny-char``), or ``path``, with ``overrides`` applied."""
    values = read_config_file(path or PRESETS_DIR / "tiny-char.toml")
    return train_config_from_dict(merge(values, overrides or {}))


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
