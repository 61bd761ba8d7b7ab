"""Rule-based rewards of the preference stage: `length`, `language`, `repetition`.

Each scores in [0, 1], 1 being the wanted behaviour, so that the stage-2 total
r = c1·helpful + c2·safety + c3·rule reads the same way for every rule.
- `length`: 1.0 inside a band of words (or characters), falling linearly to 0 over `tolerance`
  units outside it (tolerance 0: a hard band).
- `language`: the share of the completion's letters written in the expected script (the prompt's
  dominant script unless `script` is given). Fenced code and $...$ math are left out: a Chinese
  answer with Python in it is not inconsistent. None when the completion has no letters.
- `repetition`: distinct word n-grams / all word n-grams (1.0: no n-gram repeats; a completion
  that loops one phrase tends to 0). Completions shorter than n words score 1.0.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from rewards.chat import prompt_text
from rewards.registry import reward


@reward("length")
class LengthBand:
    """1.0 inside [min_length, max_length], decaying linearly to 0 over `tolerance` outside."""

    def __init__(
        self,
        min_length: int = 0,
        max_length: int | None = None,
        unit: Literal["words", "chars"] = "words",
        tolerance: int = 0,
    ) -> None:
        """Lengths and tolerance are counted in `unit`; `max_length` None means no upper bound."""
        if unit not in ("words", "chars"):
            raise ValueError(f"length unit must be 'words' or 'chars', got {unit!r}")
        if max_length is not None and max_length < min_length:
            raise ValueError(f"max_length {max_length} is below min_length {min_length}")
        self.min_length, self.max_length, self.unit, self.tolerance = min_length, max_length, unit, tolerance

    def length(self, text: str) -> int:
        return len(text.split()) if self.unit == "words" else len(text)

    def score(self, completion: str) -> float:
        length = self.length(completion)
        distance = max(self.min_length - length, 0)
        if self.max_length is not None:
            distance = max(distance, length - self.max_length)
        if distance == 0:
            return 1.0
        return max(0.0, 1.0 - distance / self.tolerance) if self.tolerance > 0 else 0.0

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        return [self.score(completion) for completion in completions]


# Unicode character names start with the script for the scripts we tell apart.
_SCRIPT_OF_NAME_PREFIX = {
    "LATIN": "latin", "CJK": "han", "CYRILLIC": "cyrillic", "ARABIC": "arabic", "GREEK": "greek",
    "HEBREW": "hebrew", "HANGUL": "hangul", "HIRAGANA": "kana", "KATAKANA": "kana",
    "DEVANAGARI": "devanagari", "THAI": "thai",
}
_NOT_PROSE = re.compile(r"```.*?```|`[^`]*`|\$\$.*?\$\$|\$[^$]*\$", re.DOTALL)


def script_counts(text: str) -> Counter[str]:
    """Letters per script ('other' for letters of scripts not listed above)."""
    counts: Counter[str] = Counter()
    for char in _NOT_PROSE.sub(" ", text):
        if char.isalpha():
            prefix = unicodedata.name(char, "").split(" ")[0]
            counts[_SCRIPT_OF_NAME_PREFIX.get(prefix, "other")] += 1
    return counts


@reward("language")
class LanguageConsistency:
    """Share of the completion's letters in the expected script."""

    def __init__(self, script: str | None = None) -> None:
        """`script`: one of latin, han, cyrillic, arabic, greek, hebrew, hangul, kana, devanagari,
        thai; None: the prompt's dominant script."""
        known = set(_SCRIPT_OF_NAME_PREFIX.values())
        if script is not None and script not in known:
            raise ValueError(f"unknown script {script!r}; known: {', '.join(sorted(known))}")
        self.script = script

    def score(self, prompt: object, completion: str) -> float | None:
        expected = self.script
        if expected is None:
            prompt_scripts = script_counts(prompt_text(prompt))
            if not prompt_scripts:
                return None
            expected = prompt_scripts.most_common(1)[0][0]
        counts = script_counts(completion)
        total = sum(counts.values())
        return counts[expected] / total if total else None

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> list[float | None]:
        return [self.score(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]


@reward("repetition")
class RepetitionPenalty:
    """Distinct word n-grams / word n-grams: 1.0 without repetition, towards 0 for a loop."""

    def __init__(self, ngram: int = 3) -> None:
        """`ngram`: the n-gram size, in whitespace-separated words."""
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        self.ngram = ngram

    def score(self, completion: str) -> float:
        words = completion.lower().split()
        ngrams = [tuple(words[i:i + self.ngram]) for i in range(len(words) - self.ngram + 1)]
        return len(set(ngrams)) / len(ngrams) if ngrams else 1.0

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        return [self.score(completion) for completion in completions]
