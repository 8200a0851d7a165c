"""The ``mlxgpt-ort`` command (also ``python -m mlxgpt_export``): run an exported model without MLX.

::

    mlxgpt-ort generate OUT_DIR --prompt "ROMEO:" --max-tokens 100 --seed 1   # streams
    mlxgpt-ort generate OUT_DIR --prompts-file prompts.txt    # one prompt a line, one batch
    mlxgpt-ort info OUT_DIR                                   # config, metadata, parity
    mlxgpt-ort serve OUT_DIR --port 8000                      # OpenAI-compatible HTTP server

The sampling options are those of ``mlxgpt generate``; an option not given takes its value
from the folder's ``generation_config.json``. The same settings and seed give the same
text as MLX. Problems a user can fix print one ``error: ...`` line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mlxgpt import __version__
from mlxgpt.cli import (
    add_sampling_args,
    float_in,
    non_negative_int,
    note_long_prompts,
    positive_int,
    run_command,
    sampling_params,
)
from mlxgpt_export.batching import Limits
from mlxgpt_export.errors import ExportError
from mlxgpt_export.runtime import OnnxGPT


def _read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"cannot read the prompts file {path}: {err}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ExportError(f"the prompts file {path} has no prompts (one per line)")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompts_file and args.prompt:
        raise ExportError("use either --prompt or --prompts-file, not both")
    model = OnnxGPT.load(args.folder, threads=args.threads)
    model.in_place = not args.no_in_place
    params, max_tokens = sampling_params(args, *model.default_settings())
    if args.prompts_file:
        prompts = _read_prompts(args.prompts_file)
        note_long_prompts(model.tokenizer, prompts, model.config.block_size)
        texts = model.generate_batch(prompts, max_tokens, params)
        for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True), 1):
            print(f"--- prompt {i} ---\n{prompt}{text}")
        return 0
    note_long_prompts(model.tokenizer, [args.prompt], model.config.block_size)
    sys.stdout.write(args.prompt)
    for piece in model.generate(args.prompt, max_tokens, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


PRECISIONS = {  # (dtype, quantization) metadata -> what it means
    ("float32", "none"): "float32",
    ("float16", "none"): "float16 (weights, activations, past/present; LayerNorm statistics, "
    "softmax and logits float32)",
    ("float32", "int8"): "int8 (MatMul weights int8, inputs quantized per call; embeddings, "
    "past/present and logits float32)",
}


def _files(folder: Path, model_path: Path) -> str:
    """The model file and its external data file, if any, with their sizes."""
    data = model_path.with_name(model_path.name + "_data")
    shown = [p for p in (model_path, data) if p.is_file()]
    return " + ".join(f"{p.relative_to(folder)} {p.stat().st_size / 1e6:.3g} MB" for p in shown)


def cmd_info(args: argparse.Namespace) -> int:
    model = OnnxGPT.load(args.folder)
    meta = model.session.get_modelmeta().custom_metadata_map
    folder = Path(args.folder)
    print(
        f"{args.folder}: {_files(folder, model.model_path)}, exported by mlxgpt "
        f"{meta.get('mlxgpt_version', '?')}, {meta.get('attention', '?')} attention"
    )
    precision = (meta.get("dtype", "float32"), meta.get("quantization", "none"))
    print(f"precision: {PRECISIONS.get(precision, ' / '.join(precision))}")
    print(f"model config: {meta.get('model_config', '?')}")
    print(f"generation defaults: {json.dumps(model.generation)}")
    print(f"parity measured at export: {meta.get('parity', '?')}")
    decodes = EXPORTED_GRAPH
    if model.in_place_session() is not None:
        decodes = IN_PLACE + (WIDENED if precision[0] == "float16" else "")
    print(f"generation decodes: {decodes}")
    return 0


IN_PLACE = "in place (the KV cache written into fixed buffers, mlxgpt_export.in_place)"
WIDENED = ", computing in float32 on the float16 weights (the CPU has no float16 kernels)"
EXPORTED_GRAPH = "on the exported graph (no in-place graph for this file or installation)"


def cmd_serve(args: argparse.Namespace) -> int:
    from mlxgpt_export.server import serve  # the HTTP stack only when serving

    limits = Limits(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens,
        max_prompts=args.max_prompts,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
    )
    return serve(
        args.folder,
        args.host,
        args.port,
        limits,
        model_id=args.model_name,
        threads=args.threads,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
    )


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over HTTP with OpenAI's completions API",
        description="An OpenAI-compatible server (POST /v1/completions, GET /v1/models, "
        "GET /health) with continuous batching. Settings a request omits come from the "
        "folder's generation_config.json. SIGTERM shuts down gracefully (exit status 0).",
    )
    defaults = Limits()
    p.add_argument("folder", help="an export folder written by `mlxgpt export`")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port",
        type=non_negative_int,
        default=8000,
        help="port; 0 = any free one (default: %(default)s)",
    )
    p.add_argument("--model-name", help="the model id clients use (default: the folder's name)")
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=defaults.max_batch,
        help="generations decoded together; 1 = no batching (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=defaults.max_queue,
        help="generations waiting for a batch slot before new requests get 503 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-tokens-cap",
        type=non_negative_int,
        default=defaults.max_tokens,
        help="largest max_tokens a request may ask for (default: %(default)s)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=defaults.max_prompt_tokens,
        help="longer prompts are refused; shorter ones keep their last block_size tokens "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-prompts",
        type=positive_int,
        default=defaults.max_prompts,
        help="prompts in one request (default: %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=defaults.max_body_bytes,
        help="larger request bodies get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=defaults.max_connections,
        help="open connections before uvicorn answers 503 (default: %(default)s)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float_in(0.0, 3600.0),
        default=10.0,
        help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)",
    )
    p.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level; info logs every request (default: %(default)s)",
    )
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxgpt-ort",
        description="Run a model exported by `mlxgpt export` with onnxruntime (no MLX needed).",
    )
    parser.add_argument("--version", action="version", version=f"mlxgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "generate",
        help="generate text with the KV cache",
        description="Stream text from an exported model. Same sampling rules and seeds as "
        "`mlxgpt generate`. Prompts longer than the context window keep their last "
        "block_size tokens. --prompts-file runs all its prompts (one a line) as one "
        "left-padded batch.",
    )
    p.add_argument("folder", help="an export folder written by `mlxgpt export`")
    add_sampling_args(p, defaults_from="the folder's generation_config.json")
    p.add_argument("--prompts-file", help="a text file with one prompt per line (a batch)")
    p.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads (default: 1)")
    p.add_argument(
        "--no-in-place",
        action="store_true",
        help="decode on the exported graph (Concat cache) instead of its in-place rewrite: "
        "slower, but holds the weights once instead of twice",
    )
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("info", help="show an export's config, metadata and parity figures")
    p.add_argument("folder")
    p.set_defaults(func=cmd_info)
    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
