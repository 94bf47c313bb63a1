"""Pack vs padding mode on one config: how full the rows are, and training tokens/s.

For each mode the config is trained for a few optimizer steps in this process through the product's
own API (`load_config` + `Trainer`) into a temporary directory, then the run's data is measured:

- bin fill: non-pad tokens / (packed rows * seq_length), the data report's fill rate (pack mode);
- batch fill: non-pad tokens / the positions the model computes (rows * the longest row of each
  micro-batch), over one epoch of this process's micro-batches: what padding wastes in each mode;
- tokens / s: non-padding tokens trained on per second of optimizer steps (from logs/metrics.jsonl).

    python benchmarks/packing.py [CONFIG] [key=value ...] [--steps N] [--threads N]

Run it from the repository root. `per_device_train_batch_size` counts samples in padding mode and
rows of `seq_length` tokens in pack mode, so the two modes make steps of different sizes; compare
tokens/s. Benchmarks print numbers; they never assert.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIG = "configs/train/demo.yaml"
MODES = ("padding", "pack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"train config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed through")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per mode (default: 20)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: torch's default)")
    args = parser.parse_intermixed_args(argv)
    if "=" in args.config and not Path(args.config).exists():  # `packing.py seq_length=1024`
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIG
    return args


def batch_fill(data, batch_size: int, seed: int) -> float:
    """Non-pad tokens / computed positions over one epoch of micro-batches (one process)."""
    from mftcoder.data.batching import rank_micro_batches

    tokens = positions = 0
    for units in rank_micro_batches(data.epoch_order(seed, 0), batch_size, 1, 0):
        tokens += data.train.tokens(units)
        positions += data.train.batch(units, pad_id=0)["input_ids"].numel()
    return tokens / positions


def measure(args: argparse.Namespace, mode: str, tmp: Path) -> dict:
    from mftcoder.run_config import load_config
    from mftcoder.training.trainer import Trainer

    out = tmp / mode
    overrides = [*args.overrides, f"padding_mode={mode}", f"max_train_steps={args.steps}", f"output_dir={out}",
                 "overwrite_output_dir=true", "evaluation_steps=null", "checkpointing_steps=null"]  # fmt: skip
    config = load_config(args.config, overrides)
    trainer = Trainer(config)
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the results
        trainer.train()
    last = [
        m for m in map(json.loads, (out / "logs" / "metrics.jsonl").read_text().splitlines()) if m["split"] == "train"
    ][-1]
    data = trainer.run.data
    tokens = sum(len(s.input_ids) for s in data.train)
    return {
        "mode": mode,
        "samples": len(data.train),
        "rows_per_epoch": data.epoch_size,
        "bin_fill": round(tokens / (data.train.units * config.seq_length), 4) if mode == "pack" else None,
        "batch_fill": round(batch_fill(data, config.per_device_train_batch_size, config.seed), 4),
        "steps": last["step"],
        "tokens_per_s": round(last["tokens"] / last["train_seconds"], 1),
        "targets_per_s": round(last["targets"] / last["train_seconds"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mftcoder-bench-") as tmp:
        results = [measure(args, mode, Path(tmp)) for mode in MODES]
    print(
        f"config: {' '.join([args.config, *args.overrides])}, {args.steps} steps per mode, {torch.get_num_threads()} threads"
    )
    print(
        f"{'mode':<9}{'samples':>9}{'rows/epoch':>12}{'bin fill':>10}{'batch fill':>12}{'tokens/s':>10}{'targets/s':>11}"
    )
    for r in results:
        bins = f"{r['bin_fill']:.1%}" if r["bin_fill"] is not None else "-"
        print(f"{r['mode']:<9}{r['samples']:>9}{r['rows_per_epoch']:>12}{bins:>10}{r['batch_fill']:>12.1%}"
              f"{r['tokens_per_s']:>10.0f}{r['targets_per_s']:>11.0f}")  # fmt: skip
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
