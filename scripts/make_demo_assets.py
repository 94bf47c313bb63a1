#!/usr/bin/env python
"""Generate the embedded demo assets under ``assets/demo/``.

The demo is a tiny, fully synthetic multi-task setup that exercises the
framework end to end on a CPU, without network access:

* ``data/<task>/<task>.jsonl``: ``chat_rounds`` records for three coding tasks,
  built from a family of small Python function templates with randomised
  names and constants, so that a tiny model can learn them in a few hundred
  steps;
* ``model/``: a byte-level BPE tokenizer trained on that data, plus the config
  of a tiny Llama model (no weights: the framework initialises them);
* ``README.md``.

Everything derives from a fixed seed: re-running the script reproduces
byte-identical data files.

Usage::

    python scripts/make_demo_assets.py
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

SEED = 20240501
RECORDS_PER_TASK = 300
MULTI_ROUND_RATE = 0.2
SYSTEM_RATE = 0.3
# Examples generated per function: the first few become unit tests, the rest
# are kept for "add another test case" follow-ups.
EXAMPLES_PER_FUNCTION = 6

VOCAB_SIZE = 2048
MAX_POSITIONS = 1024
MAX_RECORD_TOKENS = 400
BOS, EOS, UNK = "<s>", "</s>", "<unk>"

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"

TASKS = ("code_completion", "text_to_code", "unit_test_generation")
# The CoBa demo's harder task (configs/train/demo_coba.yaml), made from text_to_code's requests.
NOISY_TASK = "noisy_answers"
NOISY_ANSWER_CHARS = 24
# Both role vocabularies are valid chat_rounds; one task uses the alternative
# spelling so that the framework's role normalisation gets exercised.
TASK_ROLES = {
    "code_completion": ("human", "bot"),
    "text_to_code": ("human", "bot"),
    "unit_test_generation": ("user", "assistant"),
}
SYSTEM_PROMPTS = {
    "code_completion": (
        "You are a helpful coding assistant.",
        "You complete Python code. Answer with the full function only.",
        "You are an expert Python programmer.",
    ),
    "text_to_code": (
        "You are a helpful coding assistant.",
        "You write short, correct Python functions.",
        "You are an expert Python programmer. Reply with code only.",
    ),
    "unit_test_generation": (
        "You are a helpful coding assistant.",
        "You write concise unit tests for Python code.",
        "You are a meticulous Python tester.",
    ),
}


# --------------------------------------------------------------------------
# Function templates
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    annotation: str


@dataclass(frozen=True)
class FunctionSpec:
    """A small Python function plus what is needed to describe and test it."""

    name: str
    alt_name: str  # target of "rename it" follow-ups
    params: tuple[Param, ...]
    returns: str
    body: tuple[str, ...]  # indented relative to the ``def`` line
    description: str  # imperative and lower-case: "return x plus 3"
    examples: tuple[tuple, ...]  # argument tuples


@dataclass(frozen=True)
class Style:
    """How a FunctionSpec is rendered; follow-up requests change the style."""

    name: str
    typed: bool = False
    docstring: bool = False


def render_function(spec: FunctionSpec, style: Style) -> str:
    if style.typed:
        params = ", ".join(f"{p.name}: {p.annotation}" for p in spec.params)
        lines = [f"def {style.name}({params}) -> {spec.returns}:"]
    else:
        lines = [f"def {style.name}({', '.join(p.name for p in spec.params)}):"]
    if style.docstring:
        lines.append(f'    """{sentence(spec.description)}"""')
    lines += [f"    {line}" for line in spec.body]
    return "\n".join(lines)


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


WORDS = ("apple", "banana", "kiwi", "level", "python", "code", "data", "radar", "hello", "world", "tree", "stats", "a")
TEXT_SAMPLES = WORDS + ("hello world", "  spam  ", "Mixed Case", "")
INT_NAMES = ("x", "n", "value", "num", "a")
LIST_NAMES = ("values", "nums", "items", "xs", "data", "numbers")
ELEMENT_NAMES = ("v", "x", "item", "n")
TEXT_NAMES = ("text", "s", "word", "line")
WORD_LIST_NAMES = ("words", "names", "tokens")


def int_examples(rng: random.Random, arity: int) -> tuple[tuple, ...]:
    return tuple(tuple(rng.randint(-20, 20) for _ in range(arity)) for _ in range(EXAMPLES_PER_FUNCTION))


def int_list_examples(rng: random.Random) -> tuple[tuple, ...]:
    return tuple(([rng.randint(-9, 20) for _ in range(rng.randint(0, 5))],) for _ in range(EXAMPLES_PER_FUNCTION))


def word_list_examples(rng: random.Random) -> tuple[tuple, ...]:
    return tuple((rng.sample(WORDS, rng.randint(0, 4)),) for _ in range(EXAMPLES_PER_FUNCTION))


def text_examples(rng: random.Random) -> tuple[tuple, ...]:
    return tuple((rng.choice(TEXT_SAMPLES),) for _ in range(EXAMPLES_PER_FUNCTION))


def arithmetic(rng: random.Random) -> FunctionSpec:
    a, b = rng.sample(INT_NAMES, 2)
    k = rng.randint(2, 9)
    forms = (
        ((a, b), f"{a} * {k} + {b}", f"return {a} multiplied by {k} plus {b}"),
        ((a, b), f"({a} + {b}) * {k}", f"return the sum of {a} and {b} multiplied by {k}"),
        ((a,), f"{a} * {a} - {k}", f"return the square of {a} minus {k}"),
        ((a, b), f"{a} // {k} + {b}", f"return {a} floor-divided by {k} plus {b}"),
        ((a, b), f"abs({a} - {b}) + {k}", f"return the absolute difference of {a} and {b} plus {k}"),
    )
    names, expression, description = rng.choice(forms)
    name, alt_name = rng.sample(("combine", "compute", "scale_add", "transform", "calc", "mix"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=tuple(Param(n, "int") for n in names),
        returns="int",
        body=(f"return {expression}",),
        description=description,
        examples=int_examples(rng, len(names)),
    )


def string_op(rng: random.Random) -> FunctionSpec:
    t = rng.choice(TEXT_NAMES)
    k = rng.randint(2, 4)
    sep, suffix, prefix = rng.choice("-_ ,"), "!" * rng.randint(1, 3), rng.choice(("id_", "key_", ">> "))
    old, new = rng.sample("aeiou", 2)
    forms = (
        (f"{t}.upper() + {suffix!r}", f"return {t} in upper case followed by {suffix!r}"),
        (f"{t}[::-1]", f"return {t} reversed"),
        (f"{sep!r}.join([{t}] * {k})", f"return {t} repeated {k} times, joined by {sep!r}"),
        (f"{prefix!r} + {t}.strip()", f"return {t} without surrounding whitespace, prefixed with {prefix!r}"),
        (f"{t}.replace({old!r}, {new!r})", f"return {t} with every {old!r} replaced by {new!r}"),
    )
    expression, description = rng.choice(forms)
    name, alt_name = rng.sample(("format_text", "shout", "transform", "decorate", "process", "rewrite"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=(Param(t, "str"),),
        returns="str",
        body=(f"return {expression}",),
        description=description,
        examples=text_examples(rng),
    )


def list_op(rng: random.Random) -> FunctionSpec:
    xs, v = rng.choice(LIST_NAMES), rng.choice(ELEMENT_NAMES)
    k = rng.randint(2, 5)
    forms = (
        (f"[{v} * {k} for {v} in {xs}]", "list[int]", f"return every element of {xs} multiplied by {k}"),
        (f"[{v} + {k} for {v} in {xs}]", "list[int]", f"return every element of {xs} increased by {k}"),
        (f"sorted({xs})[:{k}]", "list[int]", f"return the {k} smallest elements of {xs} in ascending order"),
        (f"sum({xs}) * {k}", "int", f"return the sum of {xs} multiplied by {k}"),
        (f"{xs}[::-1]", "list[int]", f"return the elements of {xs} in reverse order"),
    )
    expression, returns, description = rng.choice(forms)
    name, alt_name = rng.sample(("scale", "shift", "process", "transform_list", "apply", "map_values"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=(Param(xs, "list[int]"),),
        returns=returns,
        body=(f"return {expression}",),
        description=description,
        examples=int_list_examples(rng),
    )


def extremum(rng: random.Random) -> FunctionSpec:
    xs, v = rng.choice(LIST_NAMES), rng.choice(ELEMENT_NAMES)
    default = rng.choice((0, -1, None))
    builtin, comparison, adjective = rng.choice((("max", ">", "largest"), ("min", "<", "smallest")))
    if rng.random() < 0.5:
        body = (f"if not {xs}:", f"    return {default}", f"return {builtin}({xs})")
    else:
        body = (
            f"if not {xs}:",
            f"    return {default}",
            f"best = {xs}[0]",
            f"for {v} in {xs}[1:]:",
            f"    if {v} {comparison} best:",
            f"        best = {v}",
            "return best",
        )
    name, alt_name = rng.sample((adjective, f"find_{builtin}", f"{builtin}_or_default", f"get_{adjective}"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=(Param(xs, "list[int]"),),
        returns="int | None" if default is None else "int",
        body=body,
        description=f"return the {adjective} element of {xs}, or {default} if it is empty",
        examples=int_list_examples(rng),
    )


def filtering(rng: random.Random) -> FunctionSpec:
    k = rng.randint(2, 5)
    if rng.random() < 0.6:
        xs, v, annotation = rng.choice(LIST_NAMES), rng.choice(ELEMENT_NAMES), "list[int]"
        examples = int_list_examples(rng)
        forms = (
            (f"{v} > {k}", f"return the elements of {xs} greater than {k}"),
            (f"{v} % 2 == 0", f"return the even elements of {xs}"),
            (f"{v} % {k} != 0", f"return the elements of {xs} not divisible by {k}"),
        )
    else:
        xs, v, annotation = rng.choice(WORD_LIST_NAMES), rng.choice(("w", "word", "name")), "list[str]"
        examples = word_list_examples(rng)
        prefix = rng.choice("abcdkprt")
        forms = (
            (f"len({v}) > {k}", f"return the strings in {xs} longer than {k} characters"),
            (f"{v}.startswith({prefix!r})", f"return the strings in {xs} that start with {prefix!r}"),
        )
    condition, description = rng.choice(forms)
    name, alt_name = rng.sample(("keep", "select", "filter_items", "pick", "only_matching"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=(Param(xs, annotation),),
        returns=annotation,
        body=(f"return [{v} for {v} in {xs} if {condition}]",),
        description=description,
        examples=examples,
    )


def counting(rng: random.Random) -> FunctionSpec:
    k = rng.randint(0, 6)
    if rng.random() < 0.5:
        xs, v = rng.choice(LIST_NAMES), rng.choice(ELEMENT_NAMES)
        params, examples = (Param(xs, "list[int]"),), int_list_examples(rng)
        body = ("hits = 0", f"for {v} in {xs}:", f"    if {v} > {k}:", "        hits += 1", "return hits")
        description = f"return how many elements of {xs} are greater than {k}"
    else:
        t, c = rng.choice(TEXT_NAMES), rng.choice(("c", "ch", "char"))
        params, examples = (Param(t, "str"),), text_examples(rng)
        if rng.random() < 0.5:
            ch = rng.choice("aeiolst")
            body = (f"return {t}.count({ch!r})",)
            description = f"return how many times {ch!r} occurs in {t}"
        else:
            body = (f"return sum(1 for {c} in {t}.lower() if {c} in 'aeiou')",)
            description = f"return the number of vowels in {t}"
    name, alt_name = rng.sample(("count", "tally", "count_matches", "how_many", "num_hits"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=params,
        returns="int",
        body=body,
        description=description,
        examples=examples,
    )


def clamping(rng: random.Random) -> FunctionSpec:
    x = rng.choice(INT_NAMES)
    low, high = rng.randint(-10, 0), rng.randint(1, 10)
    if rng.random() < 0.5:
        params = (Param(x, "int"),)
        body = (f"return max({low}, min({high}, {x}))",)
        description = f"return {x} clamped to the range [{low}, {high}]"
        examples = int_examples(rng, 1)
    else:
        params = (Param(x, "int"), Param("low", "int"), Param("high", "int"))
        body = (f"if {x} < low:", "    return low", f"if {x} > high:", "    return high", f"return {x}")
        description = f"return {x} limited to the range from low to high"
        examples = tuple((rng.randint(-20, 20), low, high) for _ in range(EXAMPLES_PER_FUNCTION))
    name, alt_name = rng.sample(("clamp", "clip", "bound", "limit", "clamp_value"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=params,
        returns="int",
        body=body,
        description=description,
        examples=examples,
    )


def fizzbuzz_like(rng: random.Random) -> FunctionSpec:
    n = rng.choice(("n", "i", "number"))
    a, b = sorted(rng.sample((2, 3, 5, 7), 2))
    word_a, word_b = rng.sample(("Fizz", "Buzz", "Foo", "Bar", "Ping", "Pong", "Zip", "Zap"), 2)
    both = word_a + word_b
    name, alt_name = rng.sample(("fizzbuzz", "say", "label", "game_word", "classify"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=(Param(n, "int"),),
        returns="str",
        body=(
            f"if {n} % {a * b} == 0:",
            f"    return {both!r}",
            f"if {n} % {a} == 0:",
            f"    return {word_a!r}",
            f"if {n} % {b} == 0:",
            f"    return {word_b!r}",
            f"return str({n})",
        ),
        description=(f"return {both!r}, {word_a!r} or {word_b!r} for multiples of {a * b}, {a} or {b}, else str({n})"),
        examples=tuple((rng.randint(1, 50),) for _ in range(EXAMPLES_PER_FUNCTION)),
    )


def predicate(rng: random.Random) -> FunctionSpec:
    kind = rng.choice(("divisible", "between", "palindrome"))
    if kind == "palindrome":
        t = rng.choice(TEXT_NAMES)
        params, examples = (Param(t, "str"),), text_examples(rng)
        expression, description = f"{t} == {t}[::-1]", f"return True if {t} is a palindrome"
    else:
        x = rng.choice(INT_NAMES)
        params, examples = (Param(x, "int"),), int_examples(rng, 1)
        if kind == "divisible":
            k = rng.randint(2, 7)
            expression, description = f"{x} % {k} == 0", f"return True if {x} is divisible by {k}"
        else:
            low, high = rng.randint(-10, 0), rng.randint(1, 10)
            expression = f"{low} <= {x} <= {high}"
            description = f"return True if {x} lies between {low} and {high} inclusive"
    name, alt_name = rng.sample(("check", "is_valid", "matches", "holds", "accept"), 2)
    return FunctionSpec(
        name=name,
        alt_name=alt_name,
        params=params,
        returns="bool",
        body=(f"return {expression}",),
        description=description,
        examples=examples,
    )


TEMPLATES: tuple[Callable[[random.Random], FunctionSpec], ...] = (
    arithmetic,
    string_op,
    list_op,
    extremum,
    filtering,
    counting,
    clamping,
    fizzbuzz_like,
    predicate,
)


def python_block(source: str) -> str:
    # Compiling catches template bugs before they end up in the training data.
    compile(source, "<demo>", "exec")
    return f"```python\n{source}\n```"


def signature_text(spec: FunctionSpec) -> str:
    return f"{spec.name}({', '.join(p.name for p in spec.params)})"


# --------------------------------------------------------------------------
# Conversations: each builder returns the (request, answer) exchanges
# --------------------------------------------------------------------------

Exchanges = list[tuple[str, str]]
FollowUp = Callable[[random.Random, FunctionSpec, Style], tuple[str, Style]]


def add_docstring(rng: random.Random, spec: FunctionSpec, style: Style) -> tuple[str, Style]:
    request = rng.choice(
        ("Now add a docstring.", "Add a one-line docstring, please.", "Can you document it with a docstring?")
    )
    return request, replace(style, docstring=True)


def add_type_hints(rng: random.Random, spec: FunctionSpec, style: Style) -> tuple[str, Style]:
    request = rng.choice(
        (
            "Add type hints.",
            "Now add type annotations to the signature.",
            "Please annotate the parameters and the return type.",
        )
    )
    return request, replace(style, typed=True)


def rename(rng: random.Random, spec: FunctionSpec, style: Style) -> tuple[str, Style]:
    template = rng.choice(
        ("Rename it to `{}`.", "Please call the function `{}` instead.", "Now rename the function to `{}`.")
    )
    return template.format(spec.alt_name), replace(style, name=spec.alt_name)


def applicable_code_follow_ups(spec: FunctionSpec, style: Style) -> list[FollowUp]:
    options: list[FollowUp] = []
    if not style.docstring:
        options.append(add_docstring)
    if not style.typed:
        options.append(add_type_hints)
    if style.name == spec.name:
        options.append(rename)
    return options


def code_follow_ups(rng: random.Random, spec: FunctionSpec, style: Style, count: int) -> Exchanges:
    # Every answer restates the whole function, so the model sees the
    # accumulated edits rather than a diff.
    exchanges = []
    for _ in range(count):
        request, style = rng.choice(applicable_code_follow_ups(spec, style))(rng, spec, style)
        exchanges.append((request, python_block(render_function(spec, style))))
    return exchanges


def code_completion(rng: random.Random, spec: FunctionSpec, rounds: int) -> Exchanges:
    # A bare signature does not say what to complete, so the prefix always
    # keeps the docstring. Three rounds need two applicable follow-ups, which
    # is why type hints are then left for a follow-up.
    style = Style(spec.name, typed=rounds < 3 and rng.random() < 0.3, docstring=True)
    function = render_function(spec, style)
    lines = function.splitlines()
    prefix = "\n".join(lines[: rng.randint(2, len(lines) - 1)])
    request = f"Complete the following Python code:\n```python\n{prefix}\n```"
    return [(request, python_block(function))] + code_follow_ups(rng, spec, style, rounds - 1)


def text_to_code(rng: random.Random, spec: FunctionSpec, rounds: int) -> Exchanges:
    # The instruction already describes the function; a docstring only ever
    # comes from a follow-up, which therefore stays applicable.
    style = Style(spec.name, typed=rng.random() < 0.3)
    template = rng.choice(
        (
            "Write a Python function `{signature}` to {description}.",
            "Implement `{name}` in Python. It should {description}.",
            "Create a function named `{name}` that takes {params}. It should {description}.",
            "Python function `{signature}`: {sentence}",
        )
    )
    request = template.format(
        signature=signature_text(spec),
        name=spec.name,
        params=" and ".join(p.name for p in spec.params),
        description=spec.description,
        sentence=sentence(spec.description),
    )
    answer = python_block(render_function(spec, style))
    return [(request, answer)] + code_follow_ups(rng, spec, style, rounds - 1)


@dataclass(frozen=True)
class SuiteStyle:
    cases: int
    as_function: bool


def expected_results(source: str, spec: FunctionSpec) -> list[tuple[tuple, object]]:
    namespace: dict = {}
    exec(source, namespace)
    function = namespace[spec.name]
    return [(args, function(*args)) for args in spec.examples]


def assert_line(name: str, args: tuple, result: object) -> str:
    call = f"{name}({', '.join(map(repr, args))})"
    if result is True:
        return f"assert {call}"
    if result is False:
        return f"assert not {call}"
    if result is None:
        return f"assert {call} is None"
    return f"assert {call} == {result!r}"


def render_tests(spec: FunctionSpec, results: list, style: SuiteStyle) -> str:
    asserts = [assert_line(spec.name, args, result) for args, result in results[: style.cases]]
    if not style.as_function:
        return "\n".join(asserts)
    return "\n".join([f"def test_{spec.name}():"] + [f"    {line}" for line in asserts])


def run_tests(function: str, tests: str, spec: FunctionSpec, style: SuiteStyle) -> None:
    # Expected values come from executing the function, so this only guards
    # against rendering bugs; it is cheap enough to run on every answer.
    namespace: dict = {}
    exec(f"{function}\n{tests}", namespace)
    if style.as_function:
        namespace[f"test_{spec.name}"]()


def suite_follow_up(rng: random.Random, spec: FunctionSpec, style: SuiteStyle) -> tuple[str, SuiteStyle]:
    options = []
    if style.cases < len(spec.examples):
        options.append(
            (
                rng.choice(("Add one more test case.", "Please add another assert.", "Can you cover one more input?")),
                replace(style, cases=style.cases + 1),
            )
        )
    if not style.as_function:
        options.append(
            (
                rng.choice(
                    (
                        "Wrap them in a pytest test function.",
                        f"Put the asserts inside a test function named `test_{spec.name}`.",
                    )
                ),
                replace(style, as_function=True),
            )
        )
    return rng.choice(options)


def unit_test_generation(rng: random.Random, spec: FunctionSpec, rounds: int) -> Exchanges:
    function = render_function(spec, Style(spec.name, typed=rng.random() < 0.3, docstring=rng.random() < 0.3))
    results = expected_results(function, spec)
    style = SuiteStyle(cases=rng.randint(2, 4), as_function=rng.random() < 0.4)
    turns = [(f"Write unit tests for:\n```python\n{function}\n```", style)]
    for _ in range(rounds - 1):
        turns.append(suite_follow_up(rng, spec, turns[-1][1]))
    exchanges = []
    for request, style in turns:
        tests = render_tests(spec, results, style)
        run_tests(function, tests, spec, style)
        exchanges.append((request, python_block(tests)))
    return exchanges


TASK_BUILDERS: dict[str, Callable[[random.Random, FunctionSpec, int], Exchanges]] = {
    "code_completion": code_completion,
    "text_to_code": text_to_code,
    "unit_test_generation": unit_test_generation,
}


def make_record(rng: random.Random, task: str, index: int, multi_round: bool, with_system: bool) -> dict:
    spec = rng.choice(TEMPLATES)(rng)
    rounds = rng.choice((2, 3)) if multi_round else 1
    exchanges = TASK_BUILDERS[task](rng, spec, rounds)
    human, bot = TASK_ROLES[task]
    chat_rounds = []
    if with_system:
        chat_rounds.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[task])})
    for request, answer in exchanges:
        chat_rounds += [{"role": human, "content": request}, {"role": bot, "content": answer}]
    return {"id": index, "chat_rounds": chat_rounds}


def make_task_records(task: str, count: int) -> list[dict]:
    # One generator per task (string seeds are stable across interpreter
    # runs) so that changing one task leaves the others untouched.
    rng = random.Random(f"{SEED}:{task}")
    # Sampling index sets (rather than flipping a coin per record) makes the
    # proportions exact.
    multi_round = set(rng.sample(range(count), round(count * MULTI_ROUND_RATE)))
    with_system = set(rng.sample(range(count), round(count * SYSTEM_RATE)))
    return [make_record(rng, task, index, index in multi_round, index in with_system) for index in range(count)]


def make_noisy_records(records: list[dict]) -> list[dict]:
    """text_to_code's requests answered by random characters: nothing to learn beyond the character
    distribution, so the task's loss stops falling early. Made after the tokenizer is trained and left
    out of its training, so that every other asset stays as it was."""
    rng = random.Random(f"{SEED}:{NOISY_TASK}")
    alphabet = string.ascii_lowercase + string.digits + "_"

    def noisy(turn: dict) -> dict:
        if turn["role"] != TASK_ROLES["text_to_code"][1]:
            return turn
        return turn | {"content": "".join(rng.choices(alphabet, k=NOISY_ANSWER_CHARS))}

    return [{"id": r["id"], "chat_rounds": [noisy(turn) for turn in r["chat_rounds"]]} for r in records]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# Tokenizer and model config
# --------------------------------------------------------------------------


def training_texts(records_by_task: dict[str, list[dict]]) -> Iterator[str]:
    # Role names are included so that the prompt markers get their own merges.
    for records in records_by_task.values():
        for record in records:
            for turn in record["chat_rounds"]:
                yield f"{turn['role']}\n{turn['content']}"


def train_tokenizer(records_by_task: dict[str, list[dict]]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # Llama's id layout: <unk>=0, <s>=1, </s>=2.
        special_tokens=[UNK, BOS, EOS],
        # The full byte alphabet means no input ever falls back to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(records_by_task), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
        # Cleanup would rewrite code such as "x = 's'" on decode.
        clean_up_tokenization_spaces=False,
    )


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    require(tokenizer.pad_token is None, "the demo tokenizer must not have a pad token")
    require(encode("<s>human\n") == [tokenizer.bos_token_id] + encode("human\n"), "<s> in text must map to the bos id")
    require(encode(EOS) == [tokenizer.eos_token_id], "</s> in text must map to the eos id")
    require(tokenizer.encode("def f():") == encode("def f():"), "encoding must not add special tokens")


def make_model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )


# --------------------------------------------------------------------------
# README and summary
# --------------------------------------------------------------------------

README = """\
# Demo assets

Tiny, fully synthetic assets for trying MFTCoder on a CPU without downloading
anything:

- `data/<task>/<task>.jsonl`: {records} `chat_rounds` records for each of
  {tasks}.
  Each record is generated from small Python function templates (arithmetic,
  string and list operations, filtering, counting, clamping, fizzbuzz-like
  functions, ...) with randomised names and constants; {multi_round} are
  multi-round and {system} start with a system message.
  `unit_test_generation` uses the `user`/`assistant` role names, the other
  tasks use `human`/`bot`.
- `model/`: a byte-level BPE tokenizer (vocabulary {vocab}, special tokens
  `<unk>`, `<s>`, `</s>`, no pad token) trained on that data, and the config of
  a tiny Llama model (2 layers, hidden size 128). There are no weights: the
  model is initialised from the config.

Everything here is generated deterministically by

    python scripts/make_demo_assets.py

so do not edit these files by hand; change the script and re-run it.

License: the assets are machine-generated and contain no third-party data.
They are dedicated to the public domain (CC0 1.0); you may also use them under
the license of this project.
"""


def conversation_text(record: dict) -> str:
    """Approximate the prompt the framework builds from a record."""
    parts = []
    for turn in record["chat_rounds"]:
        closing = EOS if turn["role"] in ("bot", "assistant") else ""
        parts.append(f"{BOS}{turn['role']}\n{turn['content']}{closing}\n")
    return "".join(parts)


def token_lengths(records: list[dict], tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return [len(tokenizer.encode(conversation_text(r), add_special_tokens=False)) for r in records]


def print_summary(
    records_by_task: dict[str, list[dict]], lengths_by_task: dict[str, list[int]], tokenizer: PreTrainedTokenizerFast
) -> None:
    print(
        f"tokenizer: {len(tokenizer)} tokens, bos={tokenizer.bos_token_id} "
        f"eos={tokenizer.eos_token_id} unk={tokenizer.unk_token_id} pad={tokenizer.pad_token_id}"
    )
    print(f"{'task':<22} {'records':>7} {'multi':>6} {'system':>6} {'mean tok':>8} {'max tok':>7} {'>200 tok':>8}")
    for task, records in records_by_task.items():
        lengths = lengths_by_task[task]
        multi = sum(len(r["chat_rounds"]) > 3 for r in records)
        system = sum(r["chat_rounds"][0]["role"] == "system" for r in records)
        print(
            f"{task:<22} {len(records):>7} {multi:>6} {system:>6} {statistics.mean(lengths):>8.1f} "
            f"{max(lengths):>7} {sum(n > 200 for n in lengths):>8}"
        )
    files = sorted(p for p in DEMO_DIR.rglob("*") if p.is_file())
    for path in files:
        print(f"{path.stat().st_size:>9,} B  {path.relative_to(DEMO_DIR)}")
    print(f"{sum(p.stat().st_size for p in files):>9,} B  total")


def main() -> None:
    records_by_task = {task: make_task_records(task, RECORDS_PER_TASK) for task in TASKS}
    tokenizer = train_tokenizer(records_by_task)
    check_tokenizer(tokenizer)
    lengths_by_task = {task: token_lengths(records, tokenizer) for task, records in records_by_task.items()}
    for task, lengths in lengths_by_task.items():
        require(max(lengths) <= MAX_RECORD_TOKENS, f"{task}: a record exceeds {MAX_RECORD_TOKENS} tokens")

    # Start from scratch so that stale tasks or tokenizer files cannot linger.
    for generated in ("data", "model"):
        shutil.rmtree(DEMO_DIR / generated, ignore_errors=True)
    for task, records in records_by_task.items():
        write_jsonl(DEMO_DIR / "data" / task / f"{task}.jsonl", records)
    noisy = make_noisy_records(records_by_task["text_to_code"])
    write_jsonl(DEMO_DIR / "data" / NOISY_TASK / f"{NOISY_TASK}.jsonl", noisy)
    model_dir = DEMO_DIR / "model"
    tokenizer.save_pretrained(model_dir)
    make_model_config(tokenizer).save_pretrained(model_dir)
    (DEMO_DIR / "README.md").write_text(
        README.format(
            records=RECORDS_PER_TASK,
            tasks=", ".join(f"`{t}`" for t in TASKS),
            multi_round=f"{MULTI_ROUND_RATE:.0%}",
            system=f"{SYSTEM_RATE:.0%}",
            vocab=len(tokenizer),
        ),
        encoding="utf-8",
    )
    print_summary(records_by_task, lengths_by_task, tokenizer)


if __name__ == "__main__":
    main()
