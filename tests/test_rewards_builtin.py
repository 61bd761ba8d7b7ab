"""Every built-in rule reward on hand-written right, wrong and malformed cases."""

import os

import pytest

from rewards import call_reward, extract_program, get_reward


def score(name, completions, prompts=None, **kwargs_and_columns):
    columns = {k: v for k, v in kwargs_and_columns.items() if k in ("answer", "tests")}
    kwargs = {k: v for k, v in kwargs_and_columns.items() if k not in columns}
    prompts = prompts or ["question"] * len(completions)
    return call_reward(get_reward(name, **kwargs), prompts, completions, **columns)


# --------------------------------------------------------------------------- math
@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (r"Adding them, the result is \boxed{42}.", "42", 1.0),
        (r"So the probability is \boxed{\frac{3}{4}}", "3/4", 1.0),  # symbolic: \frac{3}{4} = 3/4
        ("so the answer is 0.75", "3/4", 1.0),  # no box: last number, compared numerically
        (r"First I thought 41, but checking again: \boxed{42}", "42", 1.0),  # boxed wins over earlier numbers
        (r"\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
        (r"The answer is \boxed{43}.", "42", 0.0),
        (r"\boxed{\frac{4}{3}}", "3/4", 0.0),
        ("I am not sure how to solve this.", "42", 0.0),  # malformed: nothing to extract
        (r"\boxed{\frac{3}{4", "3/4", 0.0),  # malformed: unbalanced box
        ("", "42", 0.0),
    ],
)
def test_math_accuracy(completion, answer, expected):
    assert score("math", [completion], answer=[answer]) == [expected]


def test_math_without_gold_answer_is_not_applicable():
    assert score("math", [r"\boxed{1}", r"\boxed{1}"], answer=[None, "  "]) == [None, None]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"9 - 4 = 5. 5 - 3 = 2. The answer is \boxed{2}.", 1.0),
        (r"5 - 2 = 2. The answer is \boxed{2}.", 0.0),  # right answer, wrong equation
        (r"9 - 4 = 5. 5 - 3 = 1. So \boxed{2}.", 0.0),  # one of two equations wrong
        (r"3 × 4 = 12, 12 - 10 = 2: \boxed{2}", 1.0),
        (r"3 x 4 = 13, so \boxed{2}", 0.0),
        (r"0.5 + 1.5 = 2 and -1 + 3 = 2, \boxed{2}", 1.0),  # decimals are not read as 5 + 1 = 2
        (r"No work shown: \boxed{2}", 1.0),
        (r"2 + 2 = 4. The answer is \boxed{4}.", 0.0),  # true equations, wrong answer
    ],
)
def test_math_check_equations_also_requires_the_work_shown_to_hold(completion, expected):
    assert score("math", [completion], answer=["2"], check_equations=True) == [expected]
    # Without the check only the final answer counts.
    assert score("math", [completion], answer=["2"]) == [float("boxed{2}" in completion)]


def test_math_unparseable_gold_is_an_error_not_a_silent_zero():
    with pytest.raises(ValueError, match="gold answer"):
        score("math", [r"\boxed{1}"], answer=["}}}{{{"])


# --------------------------------------------------------------------------- format
def test_format_default_is_think_then_answer():
    completions = [
        "<think>2+2 is 4</think> The answer is 4.",
        "The answer is 4.",  # no reasoning block
        "<think>2+2 is 4</think>",  # no answer after it
        "<think>a</think><think>b</think> 4",  # two think blocks
    ]
    assert score("format", completions) == [1.0, 0.0, 0.0, 0.0]


def test_format_required_tags_in_order():
    tags = ["think", "answer"]
    completions = [
        "<think>x</think><answer>4</answer>",
        "<answer>4</answer><think>x</think>",  # wrong order
        "<think>x</think><answer>4",  # unclosed
        "<think>x<answer>4</answer></think>",  # nested, not in sequence
    ]
    assert score("format", completions, required_tags=tags) == [1.0, 0.0, 0.0, 0.0]


def test_format_boxed_answer_at_end():
    completions = [
        r"so it is \boxed{\frac{1}{2}}.",
        r"\boxed{4} and then some more text",  # box not at the end
        r"the answer: \boxed{}",  # empty box
        r"\boxed{\frac{1}{2}",  # unbalanced
        r"$\boxed{7}$",
        "7",
    ]
    assert score("format", completions, boxed_answer_at_end=True) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_format_requirements_combine():
    fn = get_reward("format", required_tags=["think"], boxed_answer_at_end=True)
    assert fn(["q"] * 3, ["<think>x</think> \\boxed{1}", "<think>x</think> 1", "\\boxed{1}"]) == [1.0, 0.0, 0.0]


def test_format_pattern():
    assert score("format", ["ANSWER: 12", "answer: 12", "ANSWER: twelve"], pattern=r"ANSWER: \d+") == [1.0, 0.0, 0.0]


# --------------------------------------------------------------------------- length
def test_length_hard_band_in_words():
    completions = ["one two", "one two three", "one two three four five", "one two three four five six"]
    assert score("length", completions, min_length=3, max_length=5) == [0.0, 1.0, 1.0, 0.0]


def test_length_soft_band_decays_linearly():
    completions = ["x" * 10, "x" * 12, "x" * 14, "x" * 20, "x" * 6]
    scores = score("length", completions, min_length=8, max_length=10, unit="chars", tolerance=4)
    assert scores == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.5])


def test_length_rejects_an_empty_band():
    with pytest.raises(ValueError, match="below min_length"):
        get_reward("length", min_length=10, max_length=5)


# --------------------------------------------------------------------------- language
def test_language_follows_the_prompt_script():
    prompts = ["What is the capital of France?", "法国的首都是哪里？", "法国的首都是哪里？", "法国的首都是哪里？"]
    completions = [
        "The capital of France is Paris.",
        "法国的首都是巴黎。",
        "The capital is Paris.",  # answered in English to a Chinese prompt
        "首都是 Paris",  # mixed: 3 Han letters, 5 Latin
    ]
    scores = score("language", completions, prompts=prompts)
    assert scores == pytest.approx([1.0, 1.0, 0.0, 3 / 8])


def test_language_ignores_code_and_math_and_skips_letterless_answers():
    prompts = ["写一个函数", "计算", "计算"]
    completions = ["好的：\n```python\ndef add(a, b):\n    return a + b\n```", "答案是 $x + y$", "42"]
    assert score("language", completions, prompts=prompts) == [1.0, 1.0, None]


def test_language_fixed_script():
    assert score("language", ["Привет мир", "hello"], script="cyrillic") == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown script 'klingon'"):
        get_reward("language", script="klingon")


# --------------------------------------------------------------------------- repetition
def test_repetition():
    varied = "the quick brown fox jumps over the lazy dog"
    looping = "I think so. " * 20
    scores = score("repetition", [varied, looping, "too short"], ngram=3)
    assert scores[0] == 1.0
    assert scores[1] < 0.1  # 3 distinct trigrams in 58
    assert scores[2] == 1.0


# --------------------------------------------------------------------------- code (program extraction and scoring)
def test_extract_program_takes_the_last_python_block():
    completion = "Try:\n```python\nx = 1\n```\nBetter:\n```python\nx = 2\n```\nOutput:\n```\n2\n```"
    assert extract_program(completion) == "x = 2\n"
    assert extract_program("no code here") is None
    assert extract_program("```\nprint(1)\n```") == "print(1)\n"  # untagged block as a fallback


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the code sandbox needs root (CAP_SYS_ADMIN)")
def test_code_scores_the_share_of_tests_passed():
    right = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    half_wrong = "```python\ndef add(a, b):\n    return a + b if a > 0 else 99\n```"  # passes 1st and 3rd
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    crashing = "```python\ndef add(a, b):\n    return a +\n```"  # syntax error
    no_code = "The function adds a and b."
    completions = [right, half_wrong, wrong, crashing, no_code, right]
    tests = [ADD_TESTS] * 5 + [[]]
    scores = score("code", completions, tests=tests, wall_timeout_s=5)
    assert scores == pytest.approx([1.0, 2 / 3, 0.0, 0.0, 0.0, None])
