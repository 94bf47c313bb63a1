"""Training throughput and utilisation of one mftcoder run: tokens/s, MFU, phase shares, peak RSS.

Runs a train config (or a preset, `--preset`) in this process through the product's own API
(`load_config` + `Trainer`) into a temporary output directory. Before the first step it measures the
machine's matmul FLOP/s in fp32 and bf16 with the thread count the run uses; during the steps it
times collation, forward, backward, clipping and the optimizer from outside the product (wrappers and
hooks installed by this script); then it prints a small table and one JSON line. See
benchmarks/README.md for what each number means and how it is measured.

    python benchmarks/throughput.py [CONFIG] [key=value ...] [--preset NAME] [--steps N] [--warmup N]
                                    [--threads N] [--no-limits] [--json-only]

Run it from the repository root (relative paths in configs resolve against the current directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG = "configs/train/demo.yaml"
CONFIGS = Path(__file__).resolve().parent / "configs"
# name: (config, default steps). The first `--warmup` steps are left out of the timed numbers.
PRESETS = {
    "tiny-lora": (CONFIGS / "tiny-lora.yaml", 11),
    "50m-full": (CONFIGS / "50m-full.yaml", 5),
}
MATMUL_SIZES = (1024, 1536, 2048)
PHASES = ("data", "forward", "backward", "clip", "optimizer", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None, help=f"train config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed through")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a benchmark config of benchmarks/configs/")
    parser.add_argument("--steps", type=int, help="optimizer steps (sets max_train_steps; default: the config's)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timed numbers (1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: torch's default)")
    parser.add_argument("--no-limits", action="store_true", help="skip the matmul FLOP/s measurement (no MFU)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line on stdout")
    args = parser.parse_intermixed_args(argv)
    if args.config and "=" in args.config and not Path(args.config).exists():  # `throughput.py lora_rank=8`
        args.overrides.insert(0, args.config)
        args.config = None
    if args.preset:
        if args.config:
            parser.error("give either a config or --preset")
        path, steps = PRESETS[args.preset]
        args.config = str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
        args.steps = args.steps or steps
    args.config = args.config or DEFAULT_CONFIG
    args.limits = not args.no_limits
    return args


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the machine's matmul limit --------------------------------------------------------------------
def matmul_limits(sizes=MATMUL_SIZES, budget_s: float = 2.0) -> dict:
    """Best FLOP/s of torch.matmul on square matrices per dtype, over sizes and the two layouts a linear
    layer uses (`a @ b`: the backward's input gradient; `a @ b.T`: nn.Linear's forward). One warm-up
    call, then timed calls until `budget_s` is spent (at least 2, at most 5); the best one counts. A
    larger size is skipped for a layout whose call already took over `budget_s`."""
    import torch

    limits: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        by_case = {}
        for layout in ("a@b", "a@b.T"):
            for n in sizes:
                a = torch.randn(n, n).to(dtype)
                b = torch.randn(n, n).to(dtype)
                bt = b.t() if layout == "a@b.T" else b
                started = time.perf_counter()
                torch.matmul(a, bt)  # warm-up
                first = time.perf_counter() - started
                times: list[float] = []
                while len(times) < 5 and (len(times) < 2 or sum(times) < budget_s):
                    started = time.perf_counter()
                    torch.matmul(a, bt)
                    times.append(time.perf_counter() - started)
                by_case[f"{layout} {n}"] = 2 * n**3 / min(times)
                if first > budget_s:
                    break
        limits[name] = {"flops": max(by_case.values()), "cases": {k: round(v / 1e9, 2) for k, v in by_case.items()}}
    return limits


# --- model FLOPs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOPs of one training step, from the model's own layers.

    Per non-padding token: 6·N for trained linear weights (forward 2, input gradient 2, weight gradient 2)
    and 4·N for frozen ones (forward and input gradient: LoRA's base), N counting the decoder's linear
    layers (LoRA's A and B included, embeddings not). The output head (hidden·vocab, 6 or 4 the same way)
    is counted at target tokens when the trainer computes logits at targets only, else at every token.
    Attention (scores and weighted sum): 12·layers·d_attn·L² per sample of L tokens (forward 4·d·L² per
    layer, backward twice that), each packed sample attending only to itself; not halved for the causal
    mask (PaLM's convention)."""

    body_trained: int
    body_frozen: int
    head: int
    head_trained: bool
    layers: int
    attn_width: int
    head_at_targets: bool

    @classmethod
    def of(cls, model) -> FlopModel:
        import torch
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(model)
        if hasattr(model, "get_base_model"):  # PEFT: the transformers model with the adapters injected
            model = model.get_base_model()
        head_module = model.get_output_embeddings()
        head_names = [name for name, m in model.named_modules() if m is head_module]
        trained = frozen = 0
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or any(name.startswith(h) for h in head_names):
                continue
            if module.weight.requires_grad:
                trained += module.weight.numel()
            else:
                frozen += module.weight.numel()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            body_trained=trained,
            body_frozen=frozen,
            head=head_module.weight.numel()
            if hasattr(head_module, "weight")
            else config.hidden_size * config.vocab_size,
            head_trained=any(p.requires_grad for p in head_module.parameters()),
            layers=config.num_hidden_layers,
            attn_width=heads * head_dim,
            head_at_targets=_logits_at_targets(model),
        )

    @property
    def per_token(self) -> int:
        return 6 * self.body_trained + 4 * self.body_frozen

    @property
    def per_head_row(self) -> int:
        return (6 if self.head_trained else 4) * self.head

    def step(self, lengths: list[int], targets: int) -> int:
        tokens = sum(lengths)
        head_rows = targets if self.head_at_targets else tokens
        attention = 12 * self.layers * self.attn_width * sum(n * n for n in lengths)
        return self.per_token * tokens + self.per_head_row * head_rows + attention


def _logits_at_targets(model) -> bool:
    try:
        from mftcoder.models.logits import logits_at_mask
    except ImportError:  # a tree from before the trainer computed logits at targets only
        return False
    return bool(logits_at_mask(model))


# --- timing from outside the product ---------------------------------------------------------------
@dataclass
class StepRecord:
    seconds: float = 0.0
    phases: dict = field(default_factory=lambda: dict.fromkeys(PHASES[:-1], 0.0))
    lengths: list = field(default_factory=list)  # non-padding length of every sample trained on
    targets: int = 0


def _timed(record_phase, phase: str, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record_phase(phase, time.perf_counter() - started)

    return wrapper


def bench_trainer(config, limits: bool):
    """A Trainer that measures the matmul limit once set up, then records every optimizer step."""
    from mftcoder.data.batching import Split
    from mftcoder.training.trainer import Trainer

    class BenchTrainer(Trainer):
        def __init__(self, config):
            super().__init__(config)
            self.steps: list[StepRecord] = []
            self.current: StepRecord | None = None
            self.limits: dict | None = None
            self.flops: FlopModel | None = None

        def phase(self, name: str, seconds: float) -> None:
            if self.current is not None:
                self.current.phases[name] += seconds

        def setup(self):
            run = super().setup()
            import torch

            # Here the thread count is the one the steps use, and nothing else runs.
            self.threads = torch.get_num_threads()
            if limits:
                self.limits = [matmul_limits()]
            self.flops = FlopModel.of(run.model)
            acc = self.accelerator
            acc.backward = _timed(self.phase, "backward", acc.backward)
            acc.clip_grad_norm_ = _timed(self.phase, "clip", acc.clip_grad_norm_)
            forward_start = {}
            run.model.register_forward_pre_hook(lambda m, a: forward_start.__setitem__(0, time.perf_counter()))
            run.model.register_forward_hook(
                lambda m, a, o: self.phase("forward", time.perf_counter() - forward_start.pop(0))
            )
            optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper
            optimizer_start = {}
            optimizer.register_step_pre_hook(lambda o, a, k: optimizer_start.__setitem__(0, time.perf_counter()))
            optimizer.register_step_post_hook(
                lambda o, a, k: self.phase("optimizer", time.perf_counter() - optimizer_start.pop(0))
            )
            return run

        def _finish(self, *args, **kwargs):
            # Measured again right after the last step: the machine's load changes while it trains, and the
            # better of the two measurements is the limit.
            if limits:
                self.limits.append(matmul_limits())
            return super()._finish(*args, **kwargs)

        def _train_step(self, *args, **kwargs):
            self.current = StepRecord()
            started = time.perf_counter()
            try:
                return super()._train_step(*args, **kwargs)
            finally:
                self.current.seconds = time.perf_counter() - started
                self.steps.append(self.current)
                self.current = None

    original_batch = Split.batch

    def batch(split, units, pad_id):
        trainer = BenchTrainer.active
        started = time.perf_counter()
        out = original_batch(split, units, pad_id)
        if trainer is not None and trainer.current is not None:
            trainer.current.phases["data"] += time.perf_counter() - started
            trainer.current.lengths += [len(s.input_ids) for u in units for s in split.unit(u)]
            trainer.current.targets += int(out["loss_mask"].sum())
        return out

    @contextlib.contextmanager
    def installed():
        Split.batch = batch
        try:
            yield
        finally:
            Split.batch = original_batch
            BenchTrainer.active = None

    BenchTrainer.active = None
    trainer = BenchTrainer(config)
    BenchTrainer.active = trainer
    return trainer, installed()


# --- one run -------------------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> dict:
    import torch

    from mftcoder.run_config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="mftcoder-bench-") as tmp:
        overrides = list(args.overrides)
        if args.steps:
            overrides.append(f"max_train_steps={args.steps}")
        overrides += [f"output_dir={tmp}/run", "overwrite_output_dir=true"]
        config = load_config(args.config, overrides)
        started = time.perf_counter()
        # The trainer's own printing goes to stderr so that stdout holds only the results.
        with contextlib.redirect_stdout(sys.stderr):
            trainer, installed = bench_trainer(config, getattr(args, "limits", False))
            with installed:
                result = trainer.train()
        wall = time.perf_counter() - started
        out = Path(tmp) / "run"
        lines = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in lines if m["split"] == "train"][-1]
        run = json.loads((out / "run.json").read_text())
        shutil.rmtree(out, ignore_errors=True)
    seconds = last["train_seconds"]
    stats = {
        "config": args.config,
        "overrides": args.overrides,
        "device": run["device"],
        "world_size": run["world_size"],
        "mixed_precision": run["mixed_precision"],
        "torch_threads": trainer.threads,
        "steps": result.steps,
        "global_batch_size": run["global_batch_size"],
        "tokens": last["tokens"],
        "targets": last["targets"],
        "train_seconds": seconds,
        "wall_seconds": round(wall, 2),
        "tokens_per_s": round(last["tokens"] / seconds, 1),
        "targets_per_s": round(last["targets"] / seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "load_average": [*load, os.getloadavg()[0]],
    }
    stats.update(utilisation(trainer, getattr(args, "warmup", 1), run["mixed_precision"]))
    return stats


def utilisation(trainer, warmup: int, mixed_precision: str) -> dict:
    """Timed numbers over the steps after the warm-up (all steps when there are no others)."""
    timed = trainer.steps[warmup:] or trainer.steps
    seconds = sum(s.seconds for s in timed)
    tokens = sum(sum(s.lengths) for s in timed)
    targets = sum(s.targets for s in timed)
    flops = sum(trainer.flops.step(s.lengths, s.targets) for s in timed)
    phases = {name: sum(s.phases.get(name, 0.0) for s in timed) for name in PHASES[:-1]}
    phases["other"] = seconds - sum(phases.values())
    fm = trainer.flops
    stats = {
        "timed_steps": len(timed),
        "timed_seconds": round(seconds, 3),
        "step_seconds": [round(s.seconds, 3) for s in trainer.steps],
        "timed_tokens": tokens,
        "timed_targets": targets,
        "timed_tokens_per_s": round(tokens / seconds, 1),
        "timed_targets_per_s": round(targets / seconds, 1),
        "params_trained_linear": fm.body_trained,
        "params_frozen_linear": fm.body_frozen,
        "params_head": fm.head,
        "head_trained": fm.head_trained,
        "head_at_targets": fm.head_at_targets,
        "flops_per_token_linear": fm.per_token,
        "flops_per_head_row": fm.per_head_row,
        "model_flops_per_token": round(flops / tokens),
        "model_flops": flops,
        "model_flops_per_s": round(flops / seconds),
        "phase_share": {name: round(value / seconds, 4) for name, value in phases.items()},
    }
    if trainer.limits:
        compute = "bf16" if mixed_precision == "bf16" else "fp32"
        limit = {k: max(m[k]["flops"] for m in trainer.limits) for k in trainer.limits[0]}
        stats["matmul_limit_flops_per_s"] = {k: round(v) for k, v in limit.items()}
        stats["matmul_before_after_gflops"] = {
            k: [round(m[k]["flops"] / 1e9, 2) for m in trainer.limits] for k in limit
        }
        stats["matmul_cases_gflops"] = [{k: v["cases"] for k, v in m.items()} for m in trainer.limits]
        stats["mfu_dtype"] = compute
        stats["mfu"] = round(flops / seconds / limit[compute], 4)
        stats["mfu_by_limit"] = {k: round(flops / seconds / v, 4) for k, v in limit.items()}
    return stats


def _g(flops: float) -> str:
    return f"{flops / 1e9:.2f} GFLOP/s"


def table(stats: dict) -> list[tuple[str, str]]:
    rows = [
        ("config", " ".join([stats["config"], *stats["overrides"]])),
        (
            "device / threads",
            f"{stats['device']}, world {stats['world_size']}, {stats['torch_threads']} threads, "
            f"mixed precision {stats['mixed_precision']}",
        ),
        ("steps", f"{stats['steps']} (global batch {stats['global_batch_size']})"),
    ]
    if "matmul_limit_flops_per_s" in stats:
        for dtype, limit in stats["matmul_limit_flops_per_s"].items():
            when = " / ".join(f"{v:g}" for v in stats["matmul_before_after_gflops"][dtype])
            best = max(stats["matmul_cases_gflops"], key=lambda m: max(m[dtype].values()))[dtype]
            cases = ", ".join(f"{k}: {v:g}" for k, v in best.items())
            rows.append((f"matmul {dtype}", f"{_g(limit)} (before / after training: {when}; best run {cases})"))
    rows += [
        (
            "FLOPs / token",
            f"{stats['model_flops_per_token'] / 1e6:.2f} M (linear {stats['flops_per_token_linear'] / 1e6:.2f} M "
            f"= 6 x {stats['params_trained_linear']:,} trained + 4 x {stats['params_frozen_linear']:,} frozen; "
            f"head {stats['flops_per_head_row'] / 1e6:.2f} M per "
            f"{'target' if stats['head_at_targets'] else 'token'}; attention 12·layers·d·L per token)",
        ),
        ("model FLOP/s", f"{_g(stats['model_flops_per_s'])} over {stats['timed_steps']} timed steps"),
    ]
    if "mfu" in stats:
        other = ", ".join(f"{stats['mfu_by_limit'][k]:.1%} of {k}" for k in stats["mfu_by_limit"])
        rows.append(("MFU", f"{stats['mfu']:.1%} of the {stats['mfu_dtype']} matmul limit ({other})"))
    shares = stats["phase_share"]
    rows += [
        ("tokens / s (timed)", f"{stats['timed_tokens_per_s']} ({stats['timed_tokens']:,} non-padding tokens)"),
        ("targets / s (timed)", f"{stats['timed_targets_per_s']} ({stats['timed_targets']:,} supervised targets)"),
        ("step time shares", ", ".join(f"{k} {v:.1%}" for k, v in shares.items())),
        ("step seconds", " ".join(f"{s:g}" for s in stats["step_seconds"]) + " (warm-up first)"),
        ("train tokens / s", f"{stats['tokens_per_s']} ({stats['tokens']:,} non-padding tokens, all steps)"),
        ("target tokens / s", f"{stats['targets_per_s']} ({stats['targets']:,} supervised targets, all steps)"),
        ("train seconds", f"{stats['train_seconds']} (optimizer steps only)"),
        ("wall seconds", f"{stats['wall_seconds']} (the whole train() call)"),
        ("peak RSS", f"{stats['peak_rss_mib']} MiB"),
        ("load average", " -> ".join(f"{v:.2f}" for v in stats["load_average"]) + " (1 min, start -> end)"),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stats = measure(args)
    if not args.json_only:
        for name, value in table(stats):
            print(f"{name:<21}{value}")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
