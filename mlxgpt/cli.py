"""The ``mlxgpt`` command: ``train``, ``generate``, ``export`` and ``viz``.

Every problem a user can fix (bad option, missing file, corrupt checkpoint, ...) is
reported as one ``error: ...`` line and exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mlxgpt import __version__
from mlxgpt.config import ConfigError
from mlxgpt.errors import UserError
from mlxgpt.sampling import DEFAULT_MAX_TOKENS, MAX_SEED, SamplingParams, with_overrides
from mlxgpt.tokenizer import Tokenizer, prompt_ids


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``, with a message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def seed_number(text: str) -> int:
    """An argparse type: a seed, 0..MAX_SEED (the range of every seed in mlxgpt)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 to {MAX_SEED} (2**32 - 1), got {text!r}"
        )
    return value


def float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value > high or value < low or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low}, {high}], got {text}")
        return value

    return parse


def number_list(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers, e.g. ``0.5,0.3,0.8``."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers such as 0.5,0.3,0.8; {item.strip()!r} is not"
            )
        values.append(value)
    return values


def add_sampling_args(p: argparse.ArgumentParser, defaults_from: str) -> None:
    """Sampling options, shared by ``mlxgpt generate`` and ``mlxgpt-ort generate``.

    Every option defaults to ``None`` ("not given"); :func:`sampling_params` fills the
    gaps from ``defaults_from``'s settings (the library's defaults, or an export folder's
    ``generation_config.json``), so no default is written down here.
    """
    p.add_argument("--prompt", default="", help="text to continue (default: empty prompt)")
    p.add_argument(
        "--max-tokens",
        type=non_negative_int,
        help=f"number of new tokens to generate (default: {defaults_from})",
    )
    p.add_argument(
        "--temperature",
        type=float_in(0.0, 100.0),
        help=f"softmax temperature; 0 = greedy (default: {defaults_from})",
    )
    p.add_argument(
        "--top-k",
        type=non_negative_int,
        help=f"keep only the k most likely tokens; 0 = off (default: {defaults_from})",
    )
    p.add_argument(
        "--top-p",
        type=float_in(0.0, 1.0, low_open=True),
        help="nucleus sampling: keep the smallest set of tokens whose "
        f"probability reaches p; 1 = off (default: {defaults_from})",
    )
    p.add_argument(
        "--seed",
        type=seed_number,
        default=None,
        help="random seed; the same seed gives the same text",
    )


def sampling_params(
    args: argparse.Namespace,
    base: SamplingParams | None = None,
    base_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> tuple[SamplingParams, int]:
    """The settings asked for on the command line; options not given come from ``base``."""
    params = with_overrides(
        base or SamplingParams(),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    return params, base_max_tokens if args.max_tokens is None else args.max_tokens


def note_long_prompts(tokenizer: Tokenizer, prompts: Sequence[str], block_size: int) -> None:
    """Tell the user (on stderr) when a prompt will be cropped to the context window."""
    for prompt in prompts:
        n = len(prompt_ids(tokenizer, prompt))
        if n > block_size:
            print(
                f"note: a prompt has {n} tokens; the model sees only the last {block_size} "
                "(its context window)",
                file=sys.stderr,
            )


# Packages of the full install that a minimal runtime install (`pip install --no-deps .
# numpy onnxruntime tokenizers`) lacks, and how to get each.
INSTALL_HINTS = {
    "mlx": "pip install 'mlx[cpu]' on Linux, pip install mlx on an Apple-silicon Mac "
    "(an exported model runs without MLX: mlxgpt-ort generate FOLDER)",
    "onnx": "pip install onnx",
    "safetensors": "pip install safetensors",
    "tqdm": "pip install tqdm",
    "matplotlib": "pip install matplotlib",
}


def missing_package_message(command: str, err: ModuleNotFoundError) -> str | None:
    """What to say when ``command`` needs a package that is not installed (None: a bug)."""
    package = (err.name or "").split(".")[0]
    if package not in INSTALL_HINTS:
        return None
    return (
        f"`{command}` needs the Python package {package}, which is not installed here: "
        f"{INSTALL_HINTS[package]}. Installing mlxgpt with its dependencies (without "
        "--no-deps) brings every package."
    )


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand; a :class:`UserError` is one clean line.

    So is a missing optional package (see :data:`INSTALL_HINTS`): the line says which
    package to install. Any other exception is a bug and keeps its traceback.
    """
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        message = missing_package_message(f"{parser.prog} {args.command}", err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    from mlxgpt.config import merge, parse_overrides
    from mlxgpt.train import resolve_config, train

    overrides = parse_overrides(args.overrides)
    flags = {
        "data": args.data,
        "out_dir": args.out_dir,
        "max_iters": args.max_iters,
        "tokenizer": args.tokenizer,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    overrides = merge(overrides, {k: v for k, v in flags.items() if v is not None})
    if args.resume and args.config:
        raise ConfigError("--resume continues a run with its own config; drop --config")
    cfg = resolve_config(args.config, overrides, args.resume, args.init_from)
    result = train(
        cfg,
        resume=args.resume,
        init_from=args.init_from,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if result.rank != 0:
        return 0  # one rank of a distributed run: rank 0 reports
    print(
        f"\ndone: step {result.step} in {result.elapsed_s:.0f}s; "
        f"train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}"
    )
    print(f"checkpoint: {result.ckpt}   loss curve: {result.loss_png}")
    if cfg.sample_tokens:
        from mlxgpt.generate import generate_text

        print(f"\n--- sample (temperature {cfg.sample_temperature}) ---")
        params = SamplingParams(temperature=cfg.sample_temperature, seed=cfg.seed)
        result.model.eval()
        for piece in generate_text(result.model, result.tokenizer, "", cfg.sample_tokens, params):
            print(piece, end="", flush=True)
        print("\n---")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mlxgpt.generate import generate_text
    from mlxgpt.model_io import load_model

    params, max_tokens = sampling_params(args)
    model, tokenizer, _ = load_model(args.checkpoint)
    note_long_prompts(tokenizer, [args.prompt], model.config.block_size)
    sys.stdout.write(args.prompt)
    for piece in generate_text(model, tokenizer, args.prompt, max_tokens, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mlxgpt_export.exporter import export_checkpoint

    export_checkpoint(
        args.checkpoint,
        args.out_dir,
        attention=args.attention,
        force=args.force,
        verify=not args.no_verify,
        dtype=args.dtype,
        quantize=args.quantize,
        **({"external_data_threshold": 0} if args.external_data else {}),
    )
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from mlxgpt.hf import describe, import_hf

    out, config = import_hf(args.hf_dir, args.out_dir)
    print(f"imported {args.hf_dir} -> {out}: GPT-2, {describe(config)}")
    print(f"try: mlxgpt generate {out} --prompt '...'   or: mlxgpt export {out} OUT_DIR")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from mlxgpt.hf import export_hf

    out = export_hf(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {out} (transformers GPT2LMHeadModel + AutoTokenizer)")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from mlxgpt import viz

    if args.what == "mask":
        viz.mask_command(size=args.size, out=args.out, row=args.row, scores=args.scores)
    else:
        for flag in ("size", "row", "scores"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag} belongs to `mlxgpt viz mask`, not `viz attention`")
        if not args.checkpoint:
            raise ConfigError(
                "`mlxgpt viz attention` needs a checkpoint: "
                "mlxgpt viz attention CKPT --prompt '...'"
            )
        viz.attention_command(args.checkpoint, args.prompt, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxgpt",
        description="Train a GPT with MLX, generate text, export it to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"mlxgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model (default: tiny character model on Tiny Shakespeare)",
        description="Train a GPT. Settings come from a preset or config file (TOML/JSON) "
        "with key=value overrides, e.g. `mlxgpt train max_iters=500 model.n_layer=2`. "
        "Built-in presets: tiny-char (default), shakespeare-char.",
    )
    p.add_argument("--config", help="config file (.toml/.json) or preset name")
    p.add_argument("--data", help="a .txt file or a folder of .txt files")
    p.add_argument("--out-dir", help="where checkpoints, log.jsonl and loss.png go")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run saved in DIR (it goes on writing there, or to --out-dir)",
    )
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start a new run (fresh optimizer, step 0) from the weights, model config and "
        "tokenizer of checkpoint CKPT, e.g. one made by `mlxgpt import-hf`; CKPT is only read",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an out_dir that holds a run (deletes its checkpoint and log)",
    )
    p.add_argument("--max-iters", type=positive_int, help="number of optimizer steps")
    p.add_argument("--tokenizer", choices=["char", "bpe"])
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="bfloat16 parameters/activations (GPUs); loss stays float32",
    )
    p.add_argument("--seed", type=seed_number, help=f"random seed, 0..{MAX_SEED}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override any config key, e.g. batch_size=8 model.n_embd=64",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Stream text from a trained checkpoint using a KV cache. "
        "Prompts longer than the context window keep their last block_size "
        "tokens.",
    )
    p.add_argument("checkpoint", help="a training out_dir or checkpoint folder")
    add_sampling_args(p, defaults_from="greedy, 200 tokens")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX",
        description="Write OUT_DIR: onnx/model.onnx plus the config, tokenizer and "
        "generation files that mlxgpt-ort, Optimum, onnxruntime-genai and transformers.js "
        "read (no MLX needed).",
    )
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument(
        "--attention",
        choices=["portable", "fused"],
        default="portable",
        help="portable: opset 17 MatMul/Softmax (default); fused: opset 23 Attention operator",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="float16: half-size graph for GPU runtimes (onnx/model_fp16.onnx)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: dynamic int8 MatMul weights, faster on CPUs (onnx/model_quantized.onnx)",
    )
    p.add_argument(
        "--external-data",
        action="store_true",
        help="weights in onnx/<model>.onnx_data beside the graph (automatic above 2 GiB)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the onnxruntime check at export time"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import-hf",
        help="turn a Hugging Face GPT-2 folder into an mlxgpt checkpoint",
        description="Read HF_DIR (config.json, model.safetensors, tokenizer.json of a "
        "GPT-2-family model) and write an mlxgpt checkpoint to OUT_DIR, ready for "
        "`mlxgpt generate` and `mlxgpt export`. No network: the folder is given.",
    )
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser(
        "export-hf",
        help="write a checkpoint as a Hugging Face GPT-2 folder",
        description="Write OUT_DIR for transformers: config.json, model.safetensors, "
        "generation_config.json, tokenizer.json and tokenizer_config.json "
        "(GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load it).",
    )
    p.add_argument("checkpoint", help="a training out_dir or checkpoint folder")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser(
        "viz",
        help="pictures of the causal mask and attention",
        description="`viz mask --size N`: the causal mask as a PNG plus a "
        "worked softmax example (`--scores 0.5,0.3,0.8,0.2,0.1 --row 2`: with your own "
        "raw scores). `viz attention CKPT --prompt ...`: the "
        "attention weights of every layer and head.",
    )
    p.add_argument("what", choices=["mask", "attention"])
    p.add_argument("checkpoint", nargs="?", help="checkpoint (for `attention`)")
    p.add_argument("--size", type=positive_int, help="mask size N (default 8)")
    p.add_argument(
        "--scores",
        type=number_list,
        metavar="S0,S1,...",
        help="raw attention scores of one query for keys 0, 1, ... (sets the size), e.g. "
        "a lesson's own numbers: the worked example masks and softmaxes them",
    )
    p.add_argument(
        "--row", type=non_negative_int, help="query row of the worked example (default: middle)"
    )
    p.add_argument("--prompt", default="To be, or not to be", help="prompt (for `attention`)")
    p.add_argument("--out", help="output PNG path")
    p.set_defaults(func=cmd_viz)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
