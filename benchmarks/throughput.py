"""Training throughput of one mftcoder run: tokens/s, target tokens/s, peak RSS, wall time.

Runs a train config in this process through the product's own API (`load_config` + `train`) into a
temporary output directory, then reads what the run logged and prints a small table and one JSON
line. See benchmarks/README.md for what each number means.

    python benchmarks/throughput.py [CONFIG] [key=value ...] [--steps N] [--threads N] [--json-only]

Relative paths in the config resolve against the current directory, as with `mftcoder train`:
run it from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/train/demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"train config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed through")
    parser.add_argument("--steps", type=int, help="optimizer steps (sets max_train_steps; default: the config's)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: torch's default)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line on stdout")
    parser.add_argument("--keep-output", action="store_true", help="keep the temporary output directory")
    args = parser.parse_intermixed_args(argv)
    # `throughput.py lora_rank=8`: the first positional is an override, not a config file.
    if "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    if args.steps is not None and args.steps <= 0:
        parser.error("--steps must be positive")
    if args.threads is not None and args.threads <= 0:
        parser.error("--threads must be positive")
    return args


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    try:
        import psutil
    except ImportError:
        return math.nan
    return psutil.Process().memory_info().rss / (1024 * 1024)


def last_train_record(metrics_path: Path) -> dict:
    last = None
    with metrics_path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("split") == "train":
                    last = record
    if last is None:
        raise SystemExit(f"no train line in {metrics_path}")
    return last


def trained_counts(config, world_size: int, steps: int) -> dict:
    """Tokens and targets of the samples the run trained on, by replaying its data and sampler.

    The data are rebuilt with the trainer's own functions (tokenization is deterministic, the split is
    seeded) and the samples of each of the `steps` optimizer steps are enumerated exactly as
    `Trainer.train` does, over all ranks. A sample's targets are `loss_mask[1:].sum()`: what `collate`
    puts in the batch's `loss_mask`, what the loss is taken over and what the data report counts.
    """
    from mftcoder.data.batching import epoch_order, rank_micro_batches
    from mftcoder.data.dataset import build_datasets
    from mftcoder.models.loading import chat_format, load_tokenizer

    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer, chat_format(config, tokenizer))
    sample_tokens = [len(s.input_ids) for s in data.train]
    sample_targets = [int(s.loss_mask[1:].sum()) for s in data.train]
    accumulation = config.gradient_accumulation_steps
    tokens = targets = done = 0
    task_targets = [0] * len(data.tasks)
    epoch = 0
    while done < steps:
        order = epoch_order(len(data.train), config.seed, epoch)
        batch = config.per_device_train_batch_size
        per_rank = [rank_micro_batches(order, batch, world_size, rank) for rank in range(world_size)]
        micro_batches = len(per_rank[0])
        for start in range(0, micro_batches, accumulation):
            for rank_batches in per_rank:
                for indices in rank_batches[start : start + accumulation]:
                    for i in indices:
                        tokens += sample_tokens[i]
                        targets += sample_targets[i]
                        task_targets[data.train[i].task_id] += sample_targets[i]
            done += 1
            if done >= steps:
                break
        epoch += 1
    valid_targets = sum(int(s.loss_mask[1:].sum()) for s in data.valid)
    return {
        "tokens": tokens,
        "targets": targets,
        "task_targets": dict(zip(data.tasks, task_targets, strict=True)),
        "train_samples": len(data.train),
        "targets_per_epoch": sum(sample_targets),
        "train_valid_targets": sum(sample_targets) + valid_targets,
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from mftcoder.config import load_config
    from mftcoder.training.trainer import train

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="mftcoder-bench-")) / "run"
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"max_train_steps={args.steps}")
    overrides += [f"output_dir={out}", "overwrite_output_dir=true"]  # last, so they win
    try:
        # The trainer's prints go to stderr, so stdout holds only the benchmark's table and JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            config = load_config(args.config, overrides)
            rss_before = current_rss_mib()
            started = time.perf_counter()
            result = train(config)
            wall = time.perf_counter() - started
            peak = peak_rss_mib()  # before the replay below, which allocates little anyway
            info = json.loads((out / "run.json").read_text(encoding="utf-8"))
            record = last_train_record(out / "logs" / "metrics.jsonl")
            report = json.loads((out / "logs" / "data_report.json").read_text(encoding="utf-8"))
            counts = trained_counts(config, info["world_size"], result.steps)
    finally:
        if args.keep_output:
            print(f"output kept in {out}", file=sys.stderr)
        else:
            shutil.rmtree(out.parent, ignore_errors=True)

    # The replay must reproduce what the trainer logged, or its target count is not the run's.
    problems = []
    if counts["tokens"] != record["tokens"]:
        problems.append(f"replayed tokens {counts['tokens']} != logged tokens {record['tokens']}")
    if record["step"] != result.steps:
        problems.append(f"last train line is step {record['step']}, the run made {result.steps} steps")
    if counts["train_samples"] != sum(t["train_samples"] for t in report.values()):
        problems.append("replayed train samples differ from data_report.json")
    if counts["train_valid_targets"] != sum(t["supervised_tokens"] for t in report.values()):
        problems.append("replayed train+valid targets differ from data_report.json supervised_tokens")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)

    seconds = float(record["train_seconds"])
    epochs = result.steps / math.ceil(
        math.ceil(counts["train_samples"] / (config.per_device_train_batch_size * info["world_size"]))
        / config.gradient_accumulation_steps
    )
    return {
        "config": str(args.config),
        "overrides": list(args.overrides) + ([f"max_train_steps={args.steps}"] if args.steps is not None else []),
        "device": info["device"],
        "world_size": info["world_size"],
        "mixed_precision": info["mixed_precision"],
        "torch_threads": torch.get_num_threads(),
        "steps": result.steps,
        "epochs": round(epochs, 4),
        "global_batch_size": info["global_batch_size"],
        "tokens": record["tokens"],
        "targets": counts["targets"],
        "task_targets": counts["task_targets"],
        "targets_exact": not problems,
        "train_seconds": seconds,
        "wall_seconds": round(wall, 3),
        "tokens_per_s": round(record["tokens"] / seconds, 1) if seconds > 0 else None,
        "targets_per_s": round(counts["targets"] / seconds, 1) if seconds > 0 else None,
        "steps_per_s": round(result.steps / seconds, 3) if seconds > 0 else None,
        "peak_rss_mib": round(peak, 1),
        "rss_before_train_mib": round(rss_before, 1),
    }


def print_table(r: dict) -> None:
    rows = [
        ("config", f"{r['config']} {' '.join(r['overrides'])}".strip()),
        ("device / threads", f"{r['device']}, world_size {r['world_size']}, {r['torch_threads']} torch threads, "
                             f"mixed_precision {r['mixed_precision']}"),
        ("steps", f"{r['steps']} ({r['epochs']} epochs, global batch {r['global_batch_size']})"),
        ("train tokens / s", f"{r['tokens_per_s']:,.1f}  ({r['tokens']:,} non-padding tokens)"),
        ("target tokens / s", f"{r['targets_per_s']:,.1f}  ({r['targets']:,} supervised targets"
                              f"{'' if r['targets_exact'] else ', NOT verified: see warnings'})"),
        ("train seconds", f"{r['train_seconds']:.1f}  (optimizer steps only: no eval, saving, setup)"),
        ("wall seconds", f"{r['wall_seconds']:.1f}  (the whole train() call)"),
        ("peak RSS", f"{r['peak_rss_mib']:,.0f} MiB  ({r['rss_before_train_mib']:,.0f} MiB before train())"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    from mftcoder.errors import MFTCoderError

    args = parse_args(argv)
    try:
        result = run(args)
    except MFTCoderError as err:  # a bad config or data: one message, as `mftcoder train` prints it
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.json_only:
        print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
