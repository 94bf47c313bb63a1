"""Does balancing the tasks' losses beat plain mixed SFT? SmolLM2-135M-Instruct, three code tasks, on a CPU.

Every run trains the same LoRA (experiments/mft_vs_sft.yaml) on the same three tasks built from the
Python standard library (experiments/stdlib_tasks.py: code completion, text to code, code to
docstring, deliberately unequal in size) for the same number of steps on the same batches; only the
loss differs:

- `mixed`: plain mixed SFT, every target token of the mixture counts once (`case1`: the token mean
  over the batch, what one task holding all the data gives);
- `case3`: every task's mean token loss counts once (MFTCoder's task balancing);
- `coba`: case3 with weights CoBa moves towards the tasks still converging.

For each seed (which also draws the train/valid/test split) it reports the per-task loss on the
held-out test split (records no run trained on nor validated on) of the base model and of each
method's final adapter, and HumanEval pass@1 (greedy, chat prompts) of the base and of each adapter.
Everything goes through the CLI a user runs (`mftcoder train`, `mftcoder eval`).

    python experiments/mft_vs_sft.py [--seeds 1 2] [--steps 80] [--humaneval-limit N] [--humaneval-seeds 1]
                                     [--out DIR]

Finished pieces are kept and skipped when run again (delete OUT to start over), so an interrupted
experiment continues where it stopped. Results: OUT/results.json, OUT/results.md (the tables),
OUT/mft_vs_sft.png. About 10 minutes per training run and 6 per HumanEval on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

import stdlib_tasks  # noqa: E402

METHODS = {"mixed": "case1", "case3": "case3", "coba": "coba"}
BASE = "base"
CONFIG = REPO / "experiments" / "mft_vs_sft.yaml"
MODEL = REPO / "outputs" / "models" / "smollm2-135m-instruct"


def mftcoder(*args: str) -> None:
    """One CLI command, in this interpreter, its output passed through; a failure stops the experiment."""
    command = [sys.executable, "-m", "mftcoder", *args]
    print("$ mftcoder " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def train(out: Path, data: Path, method: str, seed: int, steps: int) -> Path:
    run = out / "runs" / f"{method}-seed{seed}"
    if not (run / "final").is_dir():
        tasks = ",".join(str(data / task) for task in stdlib_tasks.TASKS)
        mftcoder(
            "train",
            str(CONFIG),
            f"pretrained_model_path={MODEL}",
            f"data_paths=[{tasks}]",
            f"weighted_loss_mode={METHODS[method]}",
            f"seed={seed}",
            f"max_train_steps={steps}",
            f"output_dir={run}",
            "overwrite_output_dir=true",
        )
    return run


def trained_on(run: Path) -> dict:
    """The tokens and target tokens the run trained on (cumulative in its log; the same for every
    method of a seed: same batches), and the task weights it ended with (CoBa moves them)."""
    lines = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [line for line in lines if line["split"] == "train"]
    return {
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "targets": train[-1]["targets"],
        "task_weight": next((line["task_weight"] for line in reversed(train) if "task_weight" in line), None),
    }


def test_loss(run: Path, which: str, report: Path) -> dict[str, float]:
    """Per-task loss of `which` (final or base) on `run`'s test split."""
    if not report.is_file():
        mftcoder("eval", "--run", str(run), "--checkpoint", which, "--split", "test", "--output", str(report))
    return json.loads(report.read_text())["task_loss"]


def humaneval(model: Path, report: Path, limit: int | None) -> float:
    if not report.is_file():
        extra = ["--limit", str(limit)] if limit else []
        mftcoder(
            "eval", "humaneval", "--model", str(model), "--prompt-style", "chat", "--max-new-tokens", "256",
            "--batch-size", "32", "--output", str(report), *extra,
        )  # fmt: skip
    return json.loads(report.read_text())["summary"]["pass@k"]["pass@1"]


def run_experiment(
    out: Path, seeds: list[int], steps: int, limit: int | None, humaneval_seeds: list[int] | None = None
) -> dict:
    """Trains and measures every method for `seeds`; HumanEval for the adapters of `humaneval_seeds`
    (default: all seeds), after every run's test loss, since it costs most."""
    humaneval_seeds = seeds if humaneval_seeds is None else humaneval_seeds
    subprocess.run([sys.executable, str(REPO / "scripts" / "convert_gguf.py"), "--output", str(MODEL)], check=True)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        stdlib_tasks.build(data)
    reports = out / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "data": json.loads((data / "manifest.json").read_text()),
        "steps": steps,
        "seeds": seeds,
        "humaneval_seeds": humaneval_seeds,
        "humaneval_problems": limit or 164,
        "test_loss": {},
        "humaneval_pass@1": {},
        "runs": {},
    }
    runs = {}
    for seed in seeds:
        for method in METHODS:
            run = runs[method, seed] = train(out, data, method, seed, steps)
            results["runs"][run.name] = trained_on(run)
            if method == next(iter(METHODS)):  # the base is the same for every method of a seed (same split)
                base = test_loss(run, "base", reports / f"test-loss-base-seed{seed}.json")
                results["test_loss"].setdefault(BASE, {})[str(seed)] = base
            loss = test_loss(run, "final", reports / f"test-loss-{method}-seed{seed}.json")
            results["test_loss"].setdefault(method, {})[str(seed)] = loss
    if humaneval_seeds:
        base_pass = humaneval(MODEL, reports / "humaneval-base.json", limit)
        results["humaneval_pass@1"][BASE] = {"any": base_pass}  # greedy: the same whatever the seed
    for seed in humaneval_seeds:
        for method in METHODS:
            passed = humaneval(runs[method, seed] / "final", reports / f"humaneval-{method}-seed{seed}.json", limit)
            results["humaneval_pass@1"].setdefault(method, {})[str(seed)] = passed
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(tables(results))
    plot(results, out / "mft_vs_sft.png")
    return results


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def tables(results: dict) -> str:
    """Markdown: the per-task test loss (mean ± standard deviation over seeds) and HumanEval pass@1."""
    tasks = list(stdlib_tasks.TASKS)
    rows = ["| model | " + " | ".join(tasks) + " | task mean | HumanEval pass@1 |", "|---" * (len(tasks) + 3) + "|"]
    for method, per_seed in results["test_loss"].items():
        cells = [_mean_sd([per_seed[s][task] for s in per_seed]) for task in tasks]
        means = [statistics.mean(per_seed[s][task] for task in tasks) for s in per_seed]
        passes = list(results["humaneval_pass@1"].get(method, {}).values())
        passed = _mean_sd(passes) if passes else "–"
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {_mean_sd(means)} | {passed} |")
    seeds = ", ".join(str(s) for s in results["seeds"])
    humaneval_seeds = ", ".join(str(s) for s in results["humaneval_seeds"]) or "none"
    caption = (
        f"Test loss per task (lower is better; mean ± sd over seeds {seeds}) after {results['steps']} steps, "
        f"and HumanEval pass@1 (greedy, {results['humaneval_problems']} problems; adapters of seeds "
        f"{humaneval_seeds}).\n\n"
    )
    return caption + "\n".join(rows) + "\n" + _volumes(results.get("runs", {}))


def _volumes(runs: dict) -> str:
    """What every run trained on, per seed: one figure when all methods saw the same tokens."""
    lines = []
    for seed in sorted({name.rsplit("-seed", 1)[1] for name in runs}, key=int):
        seen = {(r["steps"], r["tokens"], r["targets"]) for n, r in runs.items() if n.endswith(f"-seed{seed}")}
        what = "; ".join(
            f"{steps} steps, {tokens:,} tokens, {targets:,} target tokens" for steps, tokens, targets in seen
        )
        lines.append(f"- seed {seed}: {'every method: ' if len(seen) == 1 else 'differs by method: '}{what}")
    return "\nTrained on:\n\n" + "\n".join(lines) + "\n" if lines else ""


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    tasks = list(stdlib_tasks.TASKS)
    models = list(results["test_loss"])
    figure = Figure(figsize=(11, 4))
    loss_axes, pass_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        per_seed = results["test_loss"][model]
        means = [statistics.mean(per_seed[s][task] for s in per_seed) for task in tasks]
        positions = [t + i * width for t in range(len(tasks))]
        loss_axes.bar(positions, means, width, label=model)
        for s in per_seed:  # every seed as a dot, so the spread is visible
            loss_axes.plot(positions, [per_seed[s][task] for task in tasks], "k.", markersize=3)
        passes = list(results["humaneval_pass@1"].get(model, {}).values())
        if not passes:
            continue
        pass_axes.bar(i, statistics.mean(passes), 0.8, label=model)
        pass_axes.plot([i] * len(passes), passes, "k.", markersize=3)
    loss_axes.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    loss_axes.set_ylabel("test loss (nats per target token)")
    loss_axes.set_title("held-out loss per task")
    loss_axes.legend()
    pass_axes.set_xticks(range(len(models)), models)
    pass_axes.set_title("HumanEval pass@1")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of every run")
    parser.add_argument("--humaneval-limit", type=int, help="the first N HumanEval problems only")
    parser.add_argument(
        "--humaneval-seeds", type=int, nargs="*", help="seeds whose adapters HumanEval evaluates (default: all)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "experiments" / "mft_vs_sft")
    args = parser.parse_args(argv)
    results = run_experiment(args.out, args.seeds, args.steps, args.humaneval_limit, args.humaneval_seeds)
    print(tables(results))
    print(f"results: {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'mft_vs_sft.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
