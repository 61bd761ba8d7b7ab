"""`math`: 1.0 when the completion's final answer equals the gold `answer`, else 0.0 (math-verify).

The completion's answer is extracted by math-verify: a `\\boxed{...}` answer first, then other LaTeX
answers, then the last plain number or expression ("... so it is 3/4"). Equivalence is symbolic
(3/4 = \\frac{3}{4} = 0.75). A row without a gold answer (missing, None, empty) scores None: the
reward does not apply. A completion from which nothing can be extracted scores 0.0.

math-verify enforces its own timeouts with SIGALRM, which exists only in the main thread; the
pipeline calls rewards from worker threads, where those timeouts are off and the pipeline's own
per-reward timeout bounds a pathological expression instead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.registry import reward

_EXTRACTION = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _gold_text(answer: str) -> str:
    # A gold answer is bare ("42", "3/4", "\frac{1}{2}"); math delimiters let the LaTeX extractor
    # read LaTeX gold as well as plain expressions.
    answer = answer.strip()
    return answer if answer.startswith("$") or "\\boxed" in answer else f"${answer}$"


@reward("math")
class MathAccuracy:
    """Final-answer accuracy against the `answer` column, checked symbolically."""

    def __init__(self, float_rounding: int = 6, timeout_s: int = 5) -> None:
        """`float_rounding`: decimals kept when comparing floats; `timeout_s`: math-verify's parse
        and verify timeouts (main thread only)."""
        self.float_rounding = float_rounding
        self.timeout_s = timeout_s

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
        if not predicted:
            return 0.0
        equal = verify(gold, predicted, float_rounding=self.float_rounding, timeout_seconds=timeout)
        return 1.0 if equal else 0.0

    def __call__(self, prompts: Sequence, completions: Sequence[str], answer: Sequence[str | None]) -> list[float | None]:
        return [self.score(completion, gold) for completion, gold in zip(completions, answer, strict=True)]
