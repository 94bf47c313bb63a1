"""The cost of each loss mode: the same run in every `weighted_loss_mode`, side by side.

Each mode runs the same config and steps through `throughput.measure` (one process, a temporary
output directory). `train seconds` are the optimizer steps alone, so they show what computing a
mode's coefficients costs; `wall seconds` add what happens between steps, which for `self_paced`
and `coba` is the validation draw they evaluate at every update (and their full evaluation before
step 0).

    python benchmarks/balancing.py [CONFIG] [key=value ...] [--steps N] [--threads N] [--modes m1,m2]

Run it from the repository root; `key=value` overrides apply to every mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the sibling benchmark, not a package)

# Each mode with the settings that make it update its weights within a short run.
MODES = {
    "case1": [],
    "case2": [],
    "case3": [],
    "case4": [],
    "focal_task": ["focal_level=task"],
    "focal_sample": ["focal_level=sample"],
    "self_paced": ["selfpaced_history_length=5"],
    "coba": ["coba_warmup_steps=5", "coba_history_length=10"],
}


def mode_name(mode: str) -> str:
    return mode.split("_")[0] if mode.startswith("focal") else mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=throughput.DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per mode (default: 40)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: all)")
    args = parser.parse_intermixed_args(argv)
    if "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)
        args.config = throughput.DEFAULT_CONFIG
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; expected some of {', '.join(MODES)}")
        overrides = [*args.overrides, f"weighted_loss_mode={mode_name(mode)}", *MODES[mode]]
        run = argparse.Namespace(
            config=args.config, overrides=overrides, steps=args.steps, threads=args.threads, json_only=True
        )
        with contextlib.redirect_stdout(sys.stderr):
            stats = throughput.measure(run)
        results.append(
            {"mode": mode, **{k: stats[k] for k in ("steps", "train_seconds", "wall_seconds", "tokens_per_s")}}
        )
    base = next((r for r in results if r["mode"] == "case3"), results[0])
    print(f"{'mode':<14}{'train s':>9}{'wall s':>9}{'tokens/s':>10}{'train vs ' + base['mode']:>16}")
    for r in results:
        ratio = r["train_seconds"] / base["train_seconds"]
        print(
            f"{r['mode']:<14}{r['train_seconds']:>9.2f}{r['wall_seconds']:>9.2f}{r['tokens_per_s']:>10.0f}{ratio:>15.2f}x"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
