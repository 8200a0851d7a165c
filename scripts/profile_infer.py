"""Where a decode step's time goes: onnxruntime's own profiler over greedy generation.

    python scripts/profile_infer.py                          # every export, in-place graph
    python scripts/profile_infer.py --graph exported --precision int8 --batch 8

One model (random weights of ``bench_infer``'s default shape; ``--preset`` and ``--set``
change it) is exported in each precision asked for; generation runs ``--prompt`` tokens
then ``--new`` greedy
steps on the graph mlxgpt-ort decodes on (``in-place``, :mod:`mlxgpt_export.in_place`) or on
the exported one (``exported``, its Concat cache), with onnxruntime's profiler on. Per
operator type: microseconds of kernel time per decode step, how many nodes run a step,
and the share of the kernel time; then the median time of a whole step inside onnxruntime
(``model_run``), whose excess over the kernels is the executor's own work. One thread, as
mlxgpt-ort runs by default.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infer  # noqa: E402
from bench_infer import GREEDY, each_export, model_config, prompts_for  # noqa: E402


def profiled_session(model, graph: str, prefix: Path):
    """A one-thread session of ``model``'s file (or its in-place rewrite) with profiling on."""
    import onnxruntime as ort

    from mlxgpt_export.in_place import write_in_place_model

    path = model.model_path
    if graph == "in-place":
        path = prefix.with_suffix(".in-place.onnx")
        if not write_in_place_model(model.model_path, model.config, path):
            sys.exit("error: no in-place graph for this export (see mlxgpt_export.in_place)")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    options.enable_profiling, options.profile_file_prefix = True, str(prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile(folder: Path, graph: str, batch: int, prompt: int, new: int, scratch: Path) -> dict:
    """Per-operator kernel microseconds per decode step of one export."""
    from mlxgpt_export.runtime import OnnxGPT

    model = OnnxGPT.load(folder)
    session = profiled_session(model, graph, scratch / folder.name)
    if graph == "in-place":  # the profiled session instead of the one OnnxGPT would make
        model._in_place_session, model._in_place_tried = session, True
    else:
        model = OnnxGPT(session, model.config, model.tokenizer, model.generation)
        model.in_place = False
    prompts = prompts_for(model.config, batch, prompt).tolist()
    for _ in model.generate_batch_ids(prompts, new, GREEDY):
        pass
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    # the exported graph runs the prompt first; the in-place graph only decode steps (the
    # decoder runs a prompt on the exported graph, mlxgpt_export.runtime._InPlaceDecoder)
    prompt_runs = 0 if graph == "in-place" else 1
    steps = runs[prompt_runs:]
    decode = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    model_runs = [e for e in events if e.get("name") == "model_run"]
    decode_from = model_runs[prompt_runs]["ts"]
    kernels: dict[str, list[float]] = collections.defaultdict(list)
    for event in decode:
        if event["ts"] >= decode_from:
            kernels[event["args"]["op_name"]].append(event["dur"])
    total = sum(map(sum, kernels.values())) / len(steps)
    rows = [
        dict(op=op, us=sum(d) / len(steps), nodes=len(d) // len(steps))
        for op, d in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    ]
    return dict(rows=rows, kernel_us=total, run_us=statistics.median(steps), steps=len(steps))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--preset", default="shakespeare-char", help="shape of the random model")
    add("--set", nargs="*", default=["block_size=512"], metavar="KEY=NUMBER")
    add("--precision", nargs="+", default=["portable float32", "fused float32", "int8", "float16"])
    add("--graph", choices=("in-place", "exported"), default="in-place")
    add("--batch", type=int, default=1)
    add("--prompt", type=int, default=128)
    add("--new", type=int, default=256)
    add("--json", type=Path, help="also write the result to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = model_config(bench_infer.parse_args(["--preset", args.preset, "--set", *args.set]))
    out: dict = {"settings": {**vars(args), "json": None}, "exports": {}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        ckpt = bench_infer.random_checkpoint(tmp / "ckpt", config)
        for export, folder in each_export(ckpt, tmp):
            if not any(export.endswith(p) or export == p for p in args.precision):
                continue
            if isinstance(folder, str):
                print(f"{export}: not available: {folder}")
                continue
            result = profile(folder, args.graph, args.batch, args.prompt, args.new, tmp)
            out["exports"][export] = result
            print(
                f"\n{export}, {args.graph} graph, batch {args.batch}: {result['kernel_us']:,.0f} "
                f"us of kernels a decode step, {result['run_us']:,.0f} us inside onnxruntime "
                f"(median of {result['steps']})\n\n| operator | us a step | nodes | share |\n"
                + "|---|---|---|---|"
            )
            for row in result["rows"]:
                share = row["us"] / result["kernel_us"]
                print(f"| {row['op']} | {row['us']:,.1f} | {row['nodes']} | {share:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
