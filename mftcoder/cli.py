"""Console entry: `mftcoder train | validate | preprocess | merge | generate | eval | plot`. A thin shell over plain functions.

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


def cmd_generate(args) -> int:
    from mftcoder.errors import GenerateError
    from mftcoder.generate import Settings, chat, check_output, generate_file, load_generator, read_prompts

    settings = Settings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        n=args.n,
        stop=tuple(args.stop or ()),
        seed=args.seed,
    )
    # Everything that can be checked without the model is checked before loading it.
    settings.check()
    if (args.input is None) != (args.output is None):
        raise GenerateError("--input and --output go together (without them: an interactive chat on stdin)")
    if args.limit is not None and args.limit < 1:
        raise GenerateError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise GenerateError(f"--batch-size must be at least 1, got {args.batch_size}")
    prompts = None
    if args.input is not None:
        check_output(args.output, args.overwrite)
        prompts = read_prompts(args.input, args.limit)
    generator = load_generator(args.model, base=args.base, dtype=args.dtype, device=args.device)
    print(f"generating with {generator.description}", file=sys.stderr)
    for note in generator.notes:
        print(note, file=sys.stderr)
    if prompts is None:
        chat(generator, settings, system=args.system)
        return 0
    output = generate_file(
        generator,
        prompts,
        args.output,
        settings,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(f"wrote {output}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from mftcoder.errors import EvalError

    if args.run is not None:
        return _eval_run(args)
    if args.benchmark is None:
        raise EvalError("give a benchmark (mftcoder eval humaneval --model PATH) or --run OUTPUT_DIR")
    if args.model is None:
        raise EvalError(f"mftcoder eval {args.benchmark} needs --model PATH")
    return _eval_benchmark(args)


def _eval_benchmark(args) -> int:
    from pathlib import Path

    from mftcoder.errors import EvalError
    from mftcoder.evaluate.humaneval import (
        PROMPT_STYLES,
        HumanEvalOptions,
        evaluate_humaneval,
        load_problems,
        print_summary,
    )
    from mftcoder.evaluate.pass_at_k import parse_ks
    from mftcoder.evaluate.sandbox import Limits
    from mftcoder.generate import Settings, check_output, load_generator, resolve_source

    # Everything that can be checked without the model is checked before loading it.
    load_problems(args.benchmark, limit=1)
    settings = Settings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, n=args.n, seed=args.seed
    )
    settings.check()
    problems = []
    for name in ("limit", "batch_size", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
    problems += limits.check()
    if args.prompt_style is not None and args.prompt_style not in PROMPT_STYLES:
        problems.append(f"--prompt-style {args.prompt_style}: expected one of {', '.join(PROMPT_STYLES)}")
    if problems:
        raise EvalError("; ".join(problems))
    options = HumanEvalOptions(
        prompt_style=args.prompt_style,
        ks=parse_ks(args.k, args.n),
        batch_size=args.batch_size,
        workers=args.workers,
        limits=limits,
        limit=args.limit,
    )
    source = resolve_source(args.model, args.base)
    if args.output is not None:
        output = Path(args.output)
    else:
        run = source.model.parent if (source.model.parent / "config.yaml").is_file() else source.model
        output = run / "eval" / f"{args.benchmark}-{source.model.name}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
    check_output(output, args.overwrite)
    generator = load_generator(
        args.model, base=args.base, dtype=args.dtype, device=args.device, chat_template=args.prompt_style == "chat"
    )
    print(f"evaluating {generator.description}", file=sys.stderr)
    for note in generator.notes:
        print(note, file=sys.stderr)
    summary = evaluate_humaneval(generator, settings, options, output, overwrite=args.overwrite)
    print_summary(summary)
    return 0


def _eval_run(args) -> int:
    from pathlib import Path

    from mftcoder.errors import EvalError
    from mftcoder.evaluate.humaneval import write_json_atomic
    from mftcoder.evaluate.run_loss import BASE, check_run, loss_table, run_loss, weights_dir
    from mftcoder.generate import check_output

    if args.benchmark is not None or args.model is not None:
        raise EvalError("--run computes the loss of a run on its own split: give it without a benchmark or --model")
    run = check_run(args.run)
    name = BASE if args.checkpoint == BASE else weights_dir(run, args.checkpoint).name
    # The validation report keeps its historical name; a test report is named apart so neither overwrites the other.
    suffix = "" if args.split == "valid" else f"-{args.split}"
    output = Path(args.output) if args.output else run / "eval" / f"loss-{name}{suffix}.json"
    if args.output is None:
        output.parent.mkdir(parents=True, exist_ok=True)
    check_output(output, args.overwrite)
    result = run_loss(run, args.checkpoint, args.split, notice=lambda message: print(message, file=sys.stderr))
    write_json_atomic(output, result.to_dict())
    print(loss_table(result))
    print(f"wrote {output}", file=sys.stderr)
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

    p = sub.add_parser("generate", help="generate with a trained model: a batch from a data file, or a chat on stdin")
    p.add_argument(
        "--model",
        required=True,
        help="a merged or full model directory, an adapter directory (OUTPUT_DIR/final, OUTPUT_DIR/best), "
        "or a run's OUTPUT_DIR (its final/)",
    )
    p.add_argument("--base", help="the adapter's base model (default: the base recorded in the adapter)")
    p.add_argument("--input", help="prompts: JSONL (or .json, .gz, a directory) in any format training reads")
    p.add_argument("--output", help="JSONL file for the completions (written when all are done)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt (with --temperature > 0)")
    p.add_argument(
        "--stop", action="append", metavar="TEXT", help="cut a completion at this text (repeatable); finish: stop"
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call, left-padded (default: 8)")
    p.add_argument("--seed", type=int, help="seed for sampling: the same seed gives the same completions")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N records of --input")
    p.add_argument("--system", help="system prompt of the interactive chat")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
        help="weights dtype (default: fp32 on CPU, bf16 or fp16 on a GPU)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval",
        help="HumanEval pass@k of a model (completions run in a sandbox), or the per-task loss of a run on its own "
        "validation or held-out test split",
    )
    p.add_argument("benchmark", nargs="?", help="humaneval (see docs/eval.md); leave out with --run")
    p.add_argument("--model", help="as for generate: a model, an adapter (OUTPUT_DIR/final) or OUTPUT_DIR")
    p.add_argument("--base", help="the adapter's base model (default: the base recorded in the adapter)")
    p.add_argument(
        "--run", metavar="OUTPUT_DIR", help="per-task loss and perplexity of this run on its own split (--split)"
    )
    p.add_argument(
        "--checkpoint",
        default="final",
        help="with --run: final (default), best, step-N, a checkpoint directory, or base (the run's starting "
        "weights: the base model without adapter, or the pretrained model a full fine-tuning started from)",
    )
    p.add_argument(
        "--split",
        choices=["valid", "test"],
        default="valid",
        help="with --run: valid (default; seen by training: best/, early stopping, loss balancing) or test "
        "(held out: needs data_split [train, valid, test])",
    )
    p.add_argument(
        "--output",
        help="JSON results (default: OUTPUT_DIR/eval/<benchmark>-<weights>.json, OUTPUT_DIR/eval/loss-<weights|base>"
        "[-test].json, or MODEL/eval/)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument(
        "--prompt-style",
        help="chat (the prompt as a user message through the chat template; the default for a model trained by "
        "mftcoder) or completion (the raw prompt continued; the default otherwise)",
    )
    p.add_argument("--n", type=int, default=1, help="samples per problem (> 1 needs --temperature > 0); default 1")
    p.add_argument("--k", help="pass@k values, e.g. 1,10 (each <= --n; default: those of 1,10,100 that --n allows)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N problems (a quick run)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    p.add_argument("--workers", type=int, default=2, help="programs run in parallel in the sandbox (default: 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program, wall clock (default: 10)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (default: 1024)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
        help="weights dtype (default: fp32 on CPU, bf16 or fp16 on a GPU)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.set_defaults(func=cmd_eval)

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
