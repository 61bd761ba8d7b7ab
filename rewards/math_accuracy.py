"""`math`: 1.0 when the completion's final answer equals the gold `answer`, else 0.0 (math-verify).

The completion's answer is extracted by math-verify: a `\\boxed{...}` answer first, then other LaTeX
answers, then the last plain number or expression ("... so it is 3/4"). Equivalence is symbolic
(3/4 = \\frac{3}{4} = 0.75). A row without a gold answer (missing, None, empty) scores None: the
reward does not apply. A completion from which nothing can be extracted scores 0.0.

`check_equations=True` adds a rule-based check of the work shown: every binary integer equation
`a + b = c` (also -, *, ×, x) in the completion must hold, else the score is 0.0 even when the final
answer is right (a longer chain `a - b - c = d` is read as its last step, `b - c = d`, and fails).
An outcome-only reward pays wrong equations that happen to land on the right answer; in the stage-1
experiments on the quickstart's arithmetic (README) the check lowered held-out accuracy less than the
outcome-only reward did.

math-verify enforces its own timeouts with SIGALRM, which exists only in the main thread; the
pipeline calls rewards from worker threads, where those timeouts are off and the pipeline's own
per-reward timeout bounds a pathological expression instead.
"""

from __future__ import annotations

import operator
import re
import threading
from collections.abc import Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.registry import reward

_EXTRACTION = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
# "12 + 7 = 19": integers only, so that a fraction or a decimal is never half-read as an equation.
_EQUATION = re.compile(r"(?<!\d)(?<!\d\.)(-?\d+)\s*([-+*×x])\s*(-?\d+)\s*=\s*(-?\d+)(?!\.?\d)")
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "×": operator.mul, "x": operator.mul}


def equations_hold(completion: str) -> bool:
    """Whether every integer equation `a op b = c` written in `completion` is true (True if none)."""
    return all(_OPERATORS[op](int(left), int(right)) == int(result)
               for left, op, right, result in _EQUATION.findall(completion))


def _gold_text(answer: str) -> str:
    # A gold answer is bare ("42", "3/4", "\frac{1}{2}"); math delimiters let the LaTeX extractor
    # read LaTeX gold as well as plain expressions.
    answer = answer.strip()
    return answer if answer.startswith("$") or "\\boxed" in answer else f"${answer}$"


@reward("math")
class MathAccuracy:
    """Final-answer accuracy against the `answer` column, checked symbolically."""

    def __init__(self, float_rounding: int = 6, timeout_s: int = 5, check_equations: bool = False) -> None:
        """`float_rounding`: decimals kept when comparing floats; `timeout_s`: math-verify's parse
        and verify timeouts (main thread only); `check_equations`: also require every integer
        equation shown in the completion to hold."""
        self.float_rounding = float_rounding
        self.timeout_s = timeout_s
        self.check_equations = check_equations

    def score(self, completion: str, answer: str | None) -> float | None:
        if answer is None or not str(answer).strip():
            return None
        timeout = self.timeout_s if threading.current_thread() is threading.main_thread() else None
        # No string fallback for the gold: a gold math-verify cannot read is a data error, not a 0.
        gold = parse(_gold_text(str(answer)), extraction_config=_EXTRACTION, parsing_timeout=timeout,
                     fallback_mode="no_fallback")
        if not gold:
            raise ValueError(f"gold answer {answer!r} cannot be parsed by math-verify")
        predicted = parse(completion, extraction_config=_EXTRACTION, parsing_timeout=timeout)
        if not predicted or (self.check_equations and not equations_hold(completion)):
            return 0.0
        equal = verify(gold, predicted, float_rounding=self.float_rounding, timeout_seconds=timeout)
        return 1.0 if equal else 0.0

    def __call__(self, prompts: Sequence, completions: Sequence[str], answer: Sequence[str | None]) -> list[float | None]:
        return [self.score(completion, gold) for completion, gold in zip(completions, answer, strict=True)]
