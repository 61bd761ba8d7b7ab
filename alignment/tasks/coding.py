"""Small Python coding tasks with assert-based tests, for the code reward and for SFT.

Each task family is one tiny function ("return the sum of a and b", "reverse a string") under a few
names and phrasings, some with a constant baked in ("return x plus 7"). The expected outputs of the
tests come from a Python callable kept beside the reference source, not from running the source:
the tests of this package execute the source against them, so a wrong reference is caught.

Rows carry `prompt` (a messages list with the user turn), `tests` (assert statements), `solution`
(the reference in a ```python block, as an assistant turn would say it) and `entry_point`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WORDS = ["cat", "tree", "blue", "house", "river", "lamp", "moon", "code", "apple", "stone", "rain", "bird"]
PHRASINGS = [
    "Write a Python function {signature} that {description}.",
    "Define a function {signature} which {description}.",
    "Implement {signature} in Python. It {description}.",
    "Create a function {signature} that {description}.",
    "Please write {signature}, a function that {description}.",
    "Using Python, write {signature}. The function {description}.",
]
NUM_TESTS = 3


@dataclass(frozen=True)
class CodeTask:
    """One task: the request, the reference solution and its tests."""

    prompt: str
    """The user's request."""
    entry_point: str
    """Name of the function the tests call."""
    reference_source: str
    """A correct implementation (plain source, no markdown)."""
    tests: tuple[str, ...]
    """Assert statements that a correct implementation passes."""

    def solution_block(self) -> str:
        return f"```python\n{self.reference_source}\n```"


@dataclass(frozen=True)
class _Family:
    names: tuple[str, ...]
    params: str
    description: str
    body: str
    compute: Callable
    sample_args: Callable[[random.Random], tuple]
    constants: tuple[int, ...] = ()


def _ints(low: int, high: int, count: int) -> Callable[[random.Random], tuple]:
    return lambda rng: tuple(rng.randint(low, high) for _ in range(count))


def _word(rng: random.Random) -> tuple:
    return (rng.choice(WORDS),)


def _int_list(rng: random.Random) -> tuple:
    return ([rng.randint(-9, 20) for _ in range(rng.randint(1, 5))],)


# "{k}" in a name, description or body is the family's constant; `compute` then takes it last.
FAMILIES = [
    _Family(("add", "add_numbers", "plus"), "a, b", "returns the sum of a and b", "return a + b",
            lambda a, b: a + b, _ints(-20, 50, 2)),
    _Family(("subtract", "minus", "difference"), "a, b", "returns a minus b", "return a - b",
            lambda a, b: a - b, _ints(-20, 50, 2)),
    _Family(("multiply", "times", "product"), "a, b", "returns the product of a and b", "return a * b",
            lambda a, b: a * b, _ints(-9, 12, 2)),
    _Family(("larger", "max_of_two", "bigger"), "a, b", "returns the larger of a and b",
            "return a if a > b else b", lambda a, b: max(a, b), _ints(-20, 50, 2)),
    _Family(("smaller", "min_of_two"), "a, b", "returns the smaller of a and b",
            "return a if a < b else b", lambda a, b: min(a, b), _ints(-20, 50, 2)),
    _Family(("add_{k}", "plus_{k}"), "x", "returns x plus {k}", "return x + {k}",
            lambda x, k: x + k, _ints(-20, 50, 1), constants=(2, 3, 5, 7, 10)),
    _Family(("times_{k}", "multiply_by_{k}"), "x", "returns x multiplied by {k}", "return x * {k}",
            lambda x, k: x * k, _ints(-9, 20, 1), constants=(2, 3, 4, 5)),
    _Family(("square", "squared"), "x", "returns x squared", "return x * x",
            lambda x: x * x, _ints(-12, 12, 1)),
    _Family(("is_even",), "n", "returns True if n is even and False otherwise", "return n % 2 == 0",
            lambda n: abs(n) % 2 == 0, _ints(-20, 50, 1)),
    _Family(("is_odd",), "n", "returns True if n is odd and False otherwise", "return n % 2 == 1",
            lambda n: n % 2 != 0, _ints(-20, 50, 1)),
    _Family(("absolute", "abs_value"), "x", "returns the absolute value of x", "return x if x >= 0 else -x",
            lambda x: abs(x), _ints(-30, 30, 1)),
    _Family(("negate",), "x", "returns x with its sign flipped", "return -x",
            lambda x: -x, _ints(-30, 30, 1)),
    _Family(("reverse", "reverse_string"), "s", "returns the string s reversed", "return s[::-1]",
            lambda s: s[::-1], _word),
    _Family(("shout", "to_upper"), "s", "returns the string s in upper case", "return s.upper()",
            lambda s: s.upper(), _word),
    _Family(("first_char",), "s", "returns the first character of the string s", "return s[0]",
            lambda s: s[0], _word),
    _Family(("total", "sum_list"), "xs", "returns the sum of the numbers in the list xs", "return sum(xs)",
            lambda xs: sum(xs), _int_list),
    _Family(("count_items", "length"), "xs", "returns the number of items in the list xs", "return len(xs)",
            lambda xs: len(xs), _int_list),
    _Family(("last_item",), "xs", "returns the last item of the list xs", "return xs[-1]",
            lambda xs: xs[-1], _int_list),
    _Family(("repeat_{k}",), "s", "returns the string s repeated {k} times", "return s * {k}",
            lambda s, k: s * k, _word, constants=(2, 3)),
]


def sample_task(rng: random.Random) -> CodeTask:
    family = rng.choice(FAMILIES)
    constant = rng.choice(family.constants) if family.constants else None

    def fill(text: str) -> str:
        return text.replace("{k}", str(constant)) if constant is not None else text

    name = fill(rng.choice(family.names))
    signature = f"{name}({family.params})"
    prompt = rng.choice(PHRASINGS).format(signature=signature, description=fill(family.description))
    source = f"def {signature}:\n    {fill(family.body)}"

    tests: list[str] = []
    seen_args: set[str] = set()
    while len(tests) < NUM_TESTS:
        args = family.sample_args(rng)
        rendered = ", ".join(repr(arg) for arg in args)
        if rendered in seen_args and len(seen_args) < 3 * NUM_TESTS:
            continue  # distinct inputs, so a test set is not three copies of one check
        seen_args.add(rendered)
        expected = family.compute(*args, constant) if constant is not None else family.compute(*args)
        tests.append(f"assert {name}({rendered}) == {expected!r}")
    return CodeTask(prompt=prompt, entry_point=name, reference_source=source, tests=tuple(tests))


def sample_tasks(
    rng: random.Random, count: int, exclude_prompts: set[str] | None = None, unique: bool = False
) -> list[CodeTask]:
    """`count` tasks whose prompt is not in `exclude_prompts`; pairwise distinct prompts if `unique`."""
    excluded = set(exclude_prompts or ())
    tasks: list[CodeTask] = []
    for _ in range(100 * count + 1000):
        task = sample_task(rng)
        if task.prompt in excluded:
            continue
        tasks.append(task)
        if unique:
            excluded.add(task.prompt)
        if len(tasks) == count:
            return tasks
    raise ValueError(f"could not draw {count} coding tasks outside {len(excluded)} excluded prompts")


def prompt_row(task: CodeTask) -> dict:
    """Form for the code reward / GRPO: the user turn, the tests, the reference and its entry point."""
    return {
        "prompt": [{"role": "user", "content": task.prompt}],
        "tests": list(task.tests),
        "solution": task.solution_block(),
        "entry_point": task.entry_point,
    }


def sft_row(task: CodeTask) -> dict:
    """Chat form for SFT: the request and the reference solution as the assistant's answer."""
    return {
        "messages": [
            {"role": "user", "content": task.prompt},
            {"role": "assistant", "content": task.solution_block()},
        ]
    }
