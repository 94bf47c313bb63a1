"""Three code tasks built from the Python standard library's own functions, for the MFT-vs-SFT experiment.

The source is the CPython standard library of the interpreter that runs this (PSF License 2.0):
every module-level function and method with a docstring, outside the test suites and the GUI/tooling packages,
whose code without the docstring is 60–600 characters and has 2–20 body lines, with a docstring of
at most 500 characters whose first paragraph has 20–300. Exact duplicates
are kept once. Each function goes to exactly one task, so no function's code is seen by one task's
training and another task's held-out split:

- `code_completion`: the header, docstring and first half of the body → the rest of the body;
- `text_to_code`: the signature and docstring → the whole function without its docstring;
- `code_to_docstring`: the function without its docstring → the docstring's first paragraph.

The tasks are deliberately unequal in size (by default 1000 / 400 / 160 functions), as real task
mixtures are: that is where balancing the tasks' losses should matter. Records use MFTCoder's
`chat_rounds` layout. `manifest.json` records the Python version, the counts and each file's SHA-256,
so a run can say which data it saw.

    python experiments/stdlib_tasks.py OUT_DIR [--sizes 1000 400 160] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import platform
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

TASKS = ("code_completion", "text_to_code", "code_to_docstring")
SIZES = (1000, 400, 160)
# Test suites, GUI and tooling packages: their functions are not the library's code.
SKIPPED_PACKAGES = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "venv",
    "site-packages",
}
CODE_CHARS = (60, 600)
BODY_LINES = (2, 20)
SUMMARY_CHARS = (20, 300)
DOC_CHARS = 500


@dataclass(frozen=True)
class Function:
    """A module-level function split at its docstring: `header` (the def lines), `docstring` (its
    source lines, indented as in the file), `body` (the lines after it); `doc` is the cleaned text."""

    module: str
    name: str
    header: list[str]
    docstring: list[str]
    body: list[str]
    doc: str

    @property
    def code(self) -> str:
        """The function without its docstring."""
        return "\n".join(self.header + self.body)

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join(self.doc.split("\n\n")[0].split())


def functions_in(source: str, module: str) -> list[Function]:
    """The functions and methods of `source` that have a docstring on lines of its own and code after it."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    found = []
    for node, owner in _definitions(tree):
        if node.decorator_list:
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        if doc is None or len(node.body) < 2 or first.lineno <= node.lineno:
            continue  # no docstring, nothing after it, or `def f(): "doc"` on one line
        if lines[first.lineno - 1].strip()[:1] not in ("'", '"', "r", "u", "b") or first.end_lineno is None:
            continue
        after = lines[first.end_lineno - 1][first.end_col_offset :].strip()
        if after and not after.startswith("#"):
            continue  # code on the docstring's closing line
        # A method is dedented to the column of its `def`, as if it were a module-level function.
        own = [line[node.col_offset :] for line in lines[node.lineno - 1 : node.end_lineno]]
        header_end, doc_end = first.lineno - node.lineno, first.end_lineno - node.lineno + 1
        found.append(
            Function(
                module=module,
                name=f"{owner}{node.name}",
                header=own[:header_end],
                docstring=own[header_end:doc_end],
                body=[line for line in own[doc_end:] if line.strip()],
                doc=doc,
            )
        )
    return found


def _definitions(tree: ast.Module):
    """Module-level functions and the methods of module-level classes, with the class as a name prefix."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node, ""
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield item, f"{node.name}."


def usable(fn: Function) -> bool:
    return (
        CODE_CHARS[0] <= len(fn.code) <= CODE_CHARS[1]
        and BODY_LINES[0] <= len(fn.body) <= BODY_LINES[1]
        and SUMMARY_CHARS[0] <= len(fn.summary) <= SUMMARY_CHARS[1]
        and len(fn.doc) <= DOC_CHARS
    )


def fits(fn: Function, task: str) -> bool:
    # Completion needs a body long enough to have a first half worth seeing and a rest to write.
    return task != "code_completion" or len(fn.body) >= 4


def _block(code: str) -> str:
    return f"```python\n{code}\n```"


def record(fn: Function, task: str, index: int) -> dict:
    """The chat record of `fn` for `task`."""
    if task == "code_completion":
        half = len(fn.body) // 2
        prompt = "\n".join(fn.header + fn.docstring + fn.body[:half])
        human, bot = f"Complete this Python function.\n\n{_block(prompt)}", _block("\n".join(fn.body[half:]))
    elif task == "text_to_code":
        signature = "\n".join(fn.header)
        human = f"Write this Python function.\n\n{_block(signature)}\n\n{fn.doc}"
        bot = _block(fn.code)
    elif task == "code_to_docstring":
        human, bot = f"Summarise in one sentence what this Python function does.\n\n{_block(fn.code)}", fn.summary
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rounds = [{"role": "human", "content": human}, {"role": "bot", "content": bot}]
    return {"id": index, "source": f"{fn.module}.{fn.name}", "chat_rounds": rounds}


def assign(functions: list[Function], sizes: dict[str, int], seed: int) -> dict[str, list[Function]]:
    """Each function to one task, in a seeded order, the smallest tasks filled first (a function a
    task cannot use goes to the next one with room)."""
    order = sorted(functions, key=lambda fn: (fn.module, fn.name, fn.code))
    random.Random(seed).shuffle(order)
    tasks: dict[str, list[Function]] = {task: [] for task in sizes}
    by_size = sorted(sizes, key=lambda task: sizes[task])
    for fn in order:
        for task in by_size:
            if len(tasks[task]) < sizes[task] and fits(fn, task):
                tasks[task].append(fn)
                break
    return tasks


def stdlib_functions(root: Path | None = None) -> list[Function]:
    """The usable functions of the standard library at `root` (default: this interpreter's), without duplicates."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    seen, functions = set(), []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_PACKAGES & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        module = ".".join(relative.with_suffix("").parts)
        for fn in functions_in(source, module):
            if usable(fn) and fn.code not in seen:
                seen.add(fn.code)
                functions.append(fn)
    return functions


def build(out_dir: str | Path, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> dict:
    """Writes OUT_DIR/<task>/<task>.jsonl for the three tasks and OUT_DIR/manifest.json; returns the manifest."""
    out = Path(out_dir)
    functions = stdlib_functions()
    wanted = dict(zip(TASKS, sizes, strict=True))
    tasks = assign(functions, wanted, seed)
    manifest = {
        "source": f"CPython {platform.python_version()} standard library (PSF License 2.0)",
        "usable_functions": len(functions),
        "seed": seed,
        "tasks": {},
    }
    for task, chosen in tasks.items():
        if len(chosen) < wanted[task]:
            raise SystemExit(f"task {task}: only {len(chosen)} usable functions for the {wanted[task]} asked")
        path = out / task / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(record(fn, task, i), ensure_ascii=False) + "\n" for i, fn in enumerate(chosen))
        path.write_text(text, encoding="utf-8")
        manifest["tasks"][task] = {"records": len(chosen), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--sizes", type=int, nargs=3, default=SIZES, metavar=("COMPLETION", "TEXT2CODE", "DOCSTRING"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out_dir, tuple(args.sizes), args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
