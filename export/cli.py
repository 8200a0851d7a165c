"""The ``mlxgpt-ort`` command (also ``python -m mlxgpt_export``): run an exported model without MLX.

::

    mlxgpt-ort generate OUT_DIR --prompt "ROMEO:" --max-tokens 100 --seed 1   # streams
    mlxgpt-ort generate OUT_DIR --prompts-file prompts.txt    # one prompt a line, one batch
    mlxgpt-ort info OUT_DIR                                   # config, metadata, parity

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
    note_long_prompts,
    positive_int,
    run_command,
    sampling_params,
)
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


def cmd_info(args: argparse.Namespace) -> int:
    model = OnnxGPT.load(args.folder)
    meta = model.session.get_modelmeta().custom_metadata_map
    path = model.model_path
    print(
        f"{args.folder}: {path.relative_to(args.folder)} {path.stat().st_size / 1e6:.3g} MB, "
        "exported by mlxgpt "
        f"{meta.get('mlxgpt_version', '?')}, {meta.get('attention', '?')} attention"
    )
    print(f"model config: {meta.get('model_config', '?')}")
    print(f"generation defaults: {json.dumps(model.generation)}")
    print(f"parity measured at export: {meta.get('parity', '?')}")
    return 0


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
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("info", help="show an export's config, metadata and parity figures")
    p.add_argument("folder")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
