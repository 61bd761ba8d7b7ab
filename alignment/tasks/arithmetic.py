"""Arithmetic word problems with short worked answers.

One problem is a chain of 1..`max_operations` integer operations on 1-2 digit numbers, told as a
templated story ("Mia has 12 shells. She finds 7 more. ..."). The worked solution states one
equation per operation, left to right, and ends in `\\boxed{N}`:

    12 + 7 = 19. 19 - 4 = 15. The answer is \\boxed{15}.

It is kept that short on purpose: the tiny model of the CPU tests pays for every token.

Why these defaults: a ~2M-parameter model given a short SFT run has to get some but not all of
them right (the SFT and GRPO stage-1 tests need headroom in both directions). Measured with a
2.0M-parameter Llama-shaped proxy (hidden 192, 4 layers, vocab 512), AdamW lr 3e-3, batch 32,
assistant-only loss, greedy exact match on 200 held-out problems:

    operands, operations      220 steps   500    1000    2000
    up to 9, 1-2 (default)      10%       8.5%   15.5%   52.5%
    up to 20, 1-2              6.5%       4.5%    4.5%     9%
    up to 30, 1-2               4%         4%      4%      7%

The bottleneck is copying the operands out of the story; one-digit operands get past it first.
On one CPU thread that proxy ran 1.9 steps/s at batch 32 (~58 tokens a sequence), so the 20-60%
band needs ~1500-2000 steps (15-18 minutes on one thread); two-digit operands (max_operand=20..30) are the harder
setting for longer runs and for GRPO to improve on.

Every intermediate value stays non-negative: a subtraction never takes away more than is there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Story pieces. Names carry a pronoun so that follow-up sentences read naturally.
NAMES = [
    ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Ana", "She"), ("Leo", "He"), ("Zoe", "She"),
    ("Max", "He"), ("Ivy", "She"), ("Ben", "He"), ("Eva", "She"), ("Raj", "He"), ("Lin", "She"),
]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards", "eggs", "stamps"]
CONTAINERS = ["bags", "boxes", "jars", "baskets", "packs"]

# Sentence templates per operation; "{p}" is the pronoun, "{n}" the operand, "{item}" the noun.
START_TEMPLATES = ["{name} has {n} {item}.", "{name} starts with {n} {item}."]
GROUPS_TEMPLATES = [
    "{name} has {a} {container} with {b} {item} in each.",
    "{name} buys {a} {container} of {item}, each holding {b}.",
]
ADD_TEMPLATES = ["{p} gets {n} more.", "{p} finds {n} more.", "{p} buys {n} more."]
SUB_TEMPLATES = ["{p} gives away {n}.", "{p} loses {n}.", "{p} uses {n}."]
QUESTION_TEMPLATES = ["How many {item} does {name} have now?", "How many {item} are left?"]


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty of the generated problems."""

    min_operand: int = 1
    """Smallest number an addition or subtraction uses."""
    max_operand: int = 9
    """Largest number an addition or subtraction (and the starting amount) uses (results can reach 2 digits)."""
    min_operations: int = 1
    """Fewest operations in one problem."""
    max_operations: int = 2
    """Most operations in one problem."""
    multiplication_probability: float = 0.25
    """Chance that a problem starts with "a groups of b" (one multiplication) instead of a plain amount."""
    max_factor: int = 9
    """Largest factor of that multiplication (both factors are drawn from 2..max_factor)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(f"need 0 <= min_operand <= max_operand, got {self.min_operand}, {self.max_operand}")
        if not 1 <= self.min_operations <= self.max_operations:
            raise ValueError(
                f"need 1 <= min_operations <= max_operations, got {self.min_operations}, {self.max_operations}"
            )
        if not 0.0 <= self.multiplication_probability <= 1.0:
            raise ValueError(f"multiplication_probability must lie in [0, 1], got {self.multiplication_probability}")
        if self.max_factor < 2:
            raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One generated problem: its story, its steps and its gold answer."""

    question: str
    """The word problem shown to the model."""
    steps: tuple[tuple[int, str, int, int], ...]
    """The operations in order, each (left, op, right, result) with op one of '+', '-', '*'."""

    @property
    def answer(self) -> int:
        return self.steps[-1][3]

    @property
    def expression_key(self) -> tuple:
        """What makes two problems the same exercise, whatever the story: the numbers and operators."""
        return tuple((left, op, right) for left, op, right, _ in self.steps)

    def worked_solution(self) -> str:
        equations = " ".join(f"{left} {op} {right} = {result}." for left, op, right, result in self.steps)
        return f"{equations} The answer is \\boxed{{{self.answer}}}."


def sample_problem(rng: random.Random, config: ArithmeticConfig) -> ArithmeticProblem:
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    num_operations = rng.randint(config.min_operations, config.max_operations)
    sentences: list[str] = []
    steps: list[tuple[int, str, int, int]] = []

    if rng.random() < config.multiplication_probability:
        groups, per_group = rng.randint(2, config.max_factor), rng.randint(2, config.max_factor)
        sentences.append(
            rng.choice(GROUPS_TEMPLATES).format(
                name=name, a=groups, b=per_group, container=rng.choice(CONTAINERS), item=item
            )
        )
        value = groups * per_group
        steps.append((groups, "*", per_group, value))
        remaining = num_operations - 1
    else:
        value = rng.randint(config.min_operand, config.max_operand)
        sentences.append(rng.choice(START_TEMPLATES).format(name=name, n=value, item=item))
        # A plain start is no operation, so a one-operation problem still needs one step after it.
        remaining = num_operations

    for _ in range(remaining):
        # Subtract only when something can be taken away without going below zero.
        if value > config.min_operand and rng.random() < 0.5:
            operand = rng.randint(config.min_operand, min(value, config.max_operand))
            sentences.append(rng.choice(SUB_TEMPLATES).format(p=pronoun, n=operand))
            steps.append((value, "-", operand, value - operand))
            value -= operand
        else:
            operand = rng.randint(config.min_operand, config.max_operand)
            sentences.append(rng.choice(ADD_TEMPLATES).format(p=pronoun, n=operand))
            steps.append((value, "+", operand, value + operand))
            value += operand

    sentences.append(rng.choice(QUESTION_TEMPLATES).format(item=item, name=name))
    return ArithmeticProblem(question=" ".join(sentences), steps=tuple(steps))


def sample_problems(
    rng: random.Random, config: ArithmeticConfig, count: int, exclude: set[tuple] | None = None
) -> list[ArithmeticProblem]:
    """`count` problems whose expression_key is not in `exclude` (held-out problems stay held out)."""
    exclude = exclude or set()
    problems: list[ArithmeticProblem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(
                f"could not draw {count} arithmetic problems outside the {len(exclude)} excluded ones; "
                "widen the operand range or the number of operations"
            )
        problem = sample_problem(rng, config)
        if problem.expression_key not in exclude:
            problems.append(problem)
    return problems


def sample_unique_problems(rng: random.Random, config: ArithmeticConfig, count: int) -> list[ArithmeticProblem]:
    """`count` problems with pairwise different expression_key (for held-out test sets)."""
    seen: set[tuple] = set()
    problems: list[ArithmeticProblem] = []
    for _ in range(100 * count + 1000):
        problem = sample_problem(rng, config)
        if problem.expression_key not in seen:
            seen.add(problem.expression_key)
            problems.append(problem)
            if len(problems) == count:
                return problems
    raise ValueError(f"the arithmetic config yields fewer than {count} distinct problems")


def misread_solution(problem: ArithmeticProblem, rng: random.Random, slip_rate: float) -> str:
    """The worked solution of a sloppy demonstrator: each take-away step is misread as an addition with
    probability `slip_rate`, and the chain goes on from the wrong amount (so the boxed answer is wrong
    whenever a slip happened). Multiplications and additions are always read right."""
    if not 0.0 <= slip_rate <= 1.0:
        raise ValueError(f"slip_rate must lie in [0, 1], got {slip_rate}")
    value = problem.steps[0][0]
    equations = []
    for left, op, right, result in problem.steps:
        if op == "*":
            value = result
        else:
            if op == "-" and rng.random() < slip_rate:
                op = "+"
            left, value = value, value + right if op == "+" else value - right
            result = value
        equations.append(f"{left} {op} {right} = {result}.")
    return f"{' '.join(equations)} The answer is \\boxed{{{value}}}."


def sft_row(problem: ArithmeticProblem, solution: str | None = None) -> dict:
    """Chat form for SFT: the question and its worked solution (the correct one unless `solution` is given)."""
    return {
        "messages": [
            {"role": "user", "content": problem.question},
            {"role": "assistant", "content": problem.worked_solution() if solution is None else solution},
        ]
    }


def prompt_row(problem: ArithmeticProblem) -> dict:
    """Prompt-only form for GRPO stage 1: the user turn and the gold answer as a string."""
    return {"prompt": [{"role": "user", "content": problem.question}], "answer": str(problem.answer)}
