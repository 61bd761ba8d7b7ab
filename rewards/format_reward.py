"""`format`: 1.0 when the completion has the required shape, else 0.0.

Requirements, each optional and all of them checked when set (kwargs in the recipe):
- `required_tags`: each tag appears as exactly one `<tag>...</tag>` pair, opened before closed,
  and the pairs come in the order given (["think", "answer"] → think first);
- `boxed_answer_at_end`: the completion ends with a `\\boxed{...}` whose braces balance, followed
  by nothing but whitespace and closing punctuation;
- `pattern`: a regular expression the whole (stripped) completion must match (re.DOTALL).
With none set it checks the reasoning format of the reasoning stage: the completion opens with
exactly one `<think>...</think>` block and an answer follows it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rewards.registry import reward

_DEFAULT_TAGS = ("think",)
_DEFAULT_PATTERN = r"<think>.*</think>\s*\S.*"
_TRAILING = " \t\n.!$)]"


def ends_with_boxed_answer(text: str) -> bool:
    """Whether the text ends with a brace-balanced, non-empty `\\boxed{...}`."""
    text = text.rstrip(_TRAILING)
    start = text.rfind("\\boxed{")
    if start < 0 or not text.endswith("}"):
        return False
    depth = 0
    for position in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            # The box must close exactly at the end, and hold something.
            return position == len(text) - 1 and text[start + len("\\boxed{"):position].strip() != ""
    return False


def has_tags_in_order(text: str, tags: Sequence[str]) -> bool:
    """Whether each tag occurs as exactly one open/close pair, the pairs in the given order."""
    previous_end = -1
    for tag in tags:
        opened, closed = f"<{tag}>", f"</{tag}>"
        if text.count(opened) != 1 or text.count(closed) != 1:
            return False
        start, end = text.index(opened), text.index(closed)
        if not previous_end < start < end:
            return False
        previous_end = end
    return True


@reward("format")
class FormatReward:
    """1.0 if the completion meets every configured format requirement, else 0.0."""

    def __init__(
        self,
        required_tags: Sequence[str] = (),
        boxed_answer_at_end: bool = False,
        pattern: str | None = None,
    ) -> None:
        """See the module docstring; with no requirement given, `pattern` is the think-then-answer form."""
        if pattern is None and not required_tags and not boxed_answer_at_end:
            required_tags, pattern = _DEFAULT_TAGS, _DEFAULT_PATTERN
        self.required_tags = tuple(required_tags)
        self.boxed_answer_at_end = boxed_answer_at_end
        self.pattern = re.compile(pattern, re.DOTALL) if pattern is not None else None

    def score(self, completion: str) -> float:
        if self.required_tags and not has_tags_in_order(completion, self.required_tags):
            return 0.0
        if self.boxed_answer_at_end and not ends_with_boxed_answer(completion):
            return 0.0
        if self.pattern is not None and not self.pattern.fullmatch(completion.strip()):
            return 0.0
        return 1.0

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        return [self.score(completion) for completion in completions]
