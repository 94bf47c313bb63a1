"""Console entry: `mftcoder train | validate | preprocess | merge | plot`. A thin shell over plain functions.

Only mftcoder's own errors are caught and printed as one message (on the main process); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from mftcoder.errors import MFTCoderError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="train config (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, values parsed as YAML")
    parser.add_argument("--mftcoder-config", action="store_true", help="read CONFIG as an MFTCoder v0.5 train config")


def _load(args):
    from mftcoder.run_config import load_config

    return load_config(args.config, args.overrides, mftcoder=True if args.mftcoder_config else None)


def cmd_validate(args) -> int:
    from mftcoder.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def cmd_train(args) -> int:
    import signal

    from mftcoder.training.trainer import train

    result = train(_load(args))
    if not result.stopped_by:
        return 0
    # Preempted: exit like a process killed by that signal, so schedulers see an unfinished job.
    return 128 + signal.Signals.__members__.get(result.stopped_by, signal.SIGTERM).value


def cmd_preprocess(args) -> int:
    from mftcoder.data.cache import REPORT
    from mftcoder.data.dataset import build_datasets, report_table
    from mftcoder.data.template import chat_format
    from mftcoder.data.tokenizer import load_tokenizer
    from mftcoder.training.outputs import write_json

    config = _load(args)
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer, chat_format(config, tokenizer))
    print(report_table(data.report))
    write_json(data.cache / REPORT, data.report_dict())
    print(f"data report: {data.cache / REPORT}")
    return 0


def cmd_merge(args) -> int:
    from mftcoder.merge import merge_adapter

    merge_adapter(args.adapter, args.output, base=args.base, dtype=args.dtype, qlora_dequantized=args.qlora_dequantized)
    return 0


def cmd_plot(args) -> int:
    from mftcoder.plotting import plot_run

    for path in plot_run(args.output_dir):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mftcoder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (run under `accelerate launch` for several processes)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="print the resolved config, or every problem in it")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "preprocess", help="tokenize the data into the cache (before a multi-GPU launch); print its report"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    p.add_argument("--adapter", required=True, help="adapter directory (e.g. OUTPUT_DIR/final)")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.add_argument("--base", help="base model (default: the adapter's recorded base)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
        help="dtype of the merged weights (default: the base model's)",
    )
    p.add_argument(
        "--qlora-dequantized",
        action="store_true",
        help="for a QLoRA adapter: merge into dequant(quant(base)), the base quantised as training recorded, which "
        "reproduces the trained model (logits within 1e-4 in fp32). By default a QLoRA adapter is merged into the "
        "16/32-bit base: that keeps the full-precision base, but each quantised weight differs from what the "
        "adapter was trained with by its 4-bit rounding error (up to ~15%% of its block's largest weight; "
        "on the demo model the logits move by up to 0.14)",
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("plot", help="PNG charts of a run's per-task losses and weights, into OUTPUT_DIR/logs")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output directory")
    p.set_defaults(func=cmd_plot)
    return parser


# When one process of a launch exits, the launcher terminates the others, possibly before they have
# printed anything. Every process of a launch meets the same errors, so the main process reports
# them; another one waits this long first and reports only if it is still alive then, so that the
# message is shown once, and shown even when the main process was the slower one. Ranks start
# seconds apart on a loaded machine (3 s was too short on a 2-core CI box), and an error only one
# rank meets leaves the others blocked in a collective for far longer than this anyway.
REPORT_GRACE_SECONDS = 30.0


def report(err: MFTCoderError) -> None:
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(REPORT_GRACE_SECONDS)
    print(f"error: {err}" if rank == "0" else f"error (process {rank}): {err}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MFTCoderError as err:
        report(err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
