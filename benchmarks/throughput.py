"""Training throughput of one mftcoder run: tokens/s, target tokens/s, peak RSS, wall time.

Runs a train config in this process through the product's own API (`load_config` + `train`) into a
temporary output directory, then reads what the run logged (`logs/metrics.jsonl`, `run.json`) and
prints a small table and one JSON line. See benchmarks/README.md for what each number means.

    python benchmarks/throughput.py [CONFIG] [key=value ...] [--steps N] [--threads N] [--json-only]

Run it from the repository root (relative paths in configs resolve against the current directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
    args = parser.parse_intermixed_args(argv)
    if "=" in args.config and not Path(args.config).exists():  # `throughput.py lora_rank=8`
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    return args


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace) -> dict:
    import torch

    from mftcoder.run_config import load_config
    from mftcoder.training.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mftcoder-bench-") as tmp:
        overrides = list(args.overrides)
        if args.steps:
            overrides.append(f"max_train_steps={args.steps}")
        overrides += [f"output_dir={tmp}/run", "overwrite_output_dir=true"]
        config = load_config(args.config, overrides)
        started = time.perf_counter()
        # The trainer's own printing goes to stderr so that stdout holds only the results.
        with contextlib.redirect_stdout(sys.stderr):
            result = train(config)
        wall = time.perf_counter() - started
        out = Path(tmp) / "run"
        lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in lines if m["split"] == "train"][-1]
        run = json.loads((out / "run.json").read_text())
        shutil.rmtree(out, ignore_errors=True)
    seconds = last["train_seconds"]
    return {
        "config": args.config,
        "overrides": args.overrides,
        "device": run["device"],
        "world_size": run["world_size"],
        "mixed_precision": run["mixed_precision"],
        "torch_threads": torch.get_num_threads(),
        "steps": result.steps,
        "global_batch_size": run["global_batch_size"],
        "tokens": last["tokens"],
        "targets": last["targets"],
        "train_seconds": seconds,
        "wall_seconds": round(wall, 2),
        "tokens_per_s": round(last["tokens"] / seconds, 1),
        "targets_per_s": round(last["targets"] / seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stats = measure(args)
    if not args.json_only:
        rows = [
            ("config", " ".join([stats["config"], *stats["overrides"]])),
            (
                "device / threads",
                f"{stats['device']}, world {stats['world_size']}, {stats['torch_threads']} threads, "
                f"mixed precision {stats['mixed_precision']}",
            ),
            ("steps", f"{stats['steps']} (global batch {stats['global_batch_size']})"),
            ("train tokens / s", f"{stats['tokens_per_s']} ({stats['tokens']:,} non-padding tokens)"),
            ("target tokens / s", f"{stats['targets_per_s']} ({stats['targets']:,} supervised targets)"),
            ("train seconds", f"{stats['train_seconds']} (optimizer steps only)"),
            ("wall seconds", f"{stats['wall_seconds']} (the whole train() call)"),
            ("peak RSS", f"{stats['peak_rss_mib']} MiB"),
        ]
        for name, value in rows:
            print(f"{name:<19}{value}")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
