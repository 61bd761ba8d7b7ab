"""The shipped task generators: determinism, correct answers, passing references, disjoint held-out splits."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignment.tasks import arithmetic, coding, preferences
from alignment.tasks.__main__ import main as cli_main
from alignment.tasks.build import BuildConfig, TaskSizes, build_task_files

SMALL = TaskSizes(
    math_sft_train=300, math_grpo_train=100, math_test=50, code_train=120, code_test=30,
    helpful_train=200, helpful_test=60, safety_train=200, safety_test=60,
    chat_train=40, chat_test=20, stage2_prompts_train=40, stage2_prompts_test=20,
)


def _build(out: Path, seed: int, parquet: bool = False) -> Path:
    build_task_files(BuildConfig(out_dir=str(out), seed=seed, sizes=SMALL, parquet=parquet, tokenizer=False))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tasks_seed0"), seed=0, parquet=True)


def _rows(root: Path, name: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / name / f"{split}.jsonl").read_text().splitlines()]


def _data_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jsonl"))


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(built, tmp_path):
    again = _build(tmp_path / "again", seed=0, parquet=True)
    files = _data_files(built)
    assert [f.relative_to(built) for f in files] == [f.relative_to(again) for f in _data_files(again)]
    assert len(files) == 14
    for path in files + [built / "manifest.json"]:
        assert path.read_bytes() == (again / path.relative_to(built)).read_bytes(), path


def test_different_seed_changes_every_file(built, tmp_path):
    other = _build(tmp_path / "other", seed=1)
    for path in _data_files(built):
        assert path.read_bytes() != (other / path.relative_to(built)).read_bytes(), path


def test_manifest_describes_the_files(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["sizes"]["math_test"] == SMALL.math_test
    for key, entry in manifest["files"].items():
        rows = _rows(built, *key.split("/"))
        assert entry["rows"] == len(rows) and entry["columns"] == list(rows[0])
        import hashlib

        assert entry["sha256"] == hashlib.sha256((built / entry["path"]).read_bytes()).hexdigest()
    assert manifest["files"]["sft_mix/train"]["rows"] == SMALL.math_sft_train + SMALL.code_train + SMALL.chat_train


# --- arithmetic: an independent solver that reads the story ----------------------------------

ADD_VERBS = ("gets", "finds", "buys")
SUB_VERBS = ("gives away", "loses", "uses")


def solve_story(question: str) -> tuple[int, list[tuple[int, str, int]]]:
    """Answer a generated word problem from its words alone; returns the answer and the (left, op, right) steps."""
    sentences = [s for s in re.split(r"(?<=[.?])\s+", question) if s]
    assert sentences[-1].startswith("How many"), question
    first = [int(n) for n in re.findall(r"\d+", sentences[0])]
    steps: list[tuple[int, str, int]] = []
    if "in each" in sentences[0] or "each holding" in sentences[0]:
        assert len(first) == 2, question
        value = first[0] * first[1]
        steps.append((first[0], "*", first[1]))
    else:
        assert len(first) == 1, question
        value = first[0]
    for sentence in sentences[1:-1]:
        (number,) = [int(n) for n in re.findall(r"\d+", sentence)]
        if any(f" {verb} " in sentence for verb in ADD_VERBS):
            steps.append((value, "+", number))
            value += number
        elif any(f" {verb} " in sentence for verb in SUB_VERBS):
            steps.append((value, "-", number))
            value -= number
        else:
            raise AssertionError(f"unknown sentence {sentence!r}")
    return value, steps


STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
SOLUTION = re.compile(r"^((?:\d+ [-+*] \d+ = \d+\. )+)The answer is \\boxed\{(\d+)\}\.$")


def test_math_sft_solutions_are_correct(built):
    for split in ("train", "test"):
        for row in _rows(built, "math_sft", split):
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            match = SOLUTION.match(assistant["content"])
            assert match, assistant["content"]
            answer, story_steps = solve_story(user["content"])
            written = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(match.group(1))]
            assert [(a, op, b) for a, op, b, _ in written] == story_steps, row
            for a, op, b, c in written:
                assert c == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0, row
            assert int(match.group(2)) == written[-1][3] == answer


def test_sloppy_demonstrations_misread_take_aways_only_in_sft_train(built, tmp_path):
    sloppy = tmp_path / "sloppy"
    build_task_files(BuildConfig(out_dir=str(sloppy), seed=0, sizes=SMALL, tokenizer=False, math_sft_slip_rate=0.5))
    misread = take_aways = 0
    for row in _rows(sloppy, "math_sft", "train"):
        user, assistant = row["messages"]
        match = SOLUTION.match(assistant["content"])
        assert match, assistant["content"]
        _, story_steps = solve_story(user["content"])
        written = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(match.group(1))]
        value = written[0][0]
        for (a, op, b, c), (_, story_op, story_b) in zip(written, story_steps, strict=True):
            # Every written equation holds and continues the chain; only a take-away may turn into '+'.
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op], row
            assert b == story_b and (op == story_op or (story_op, op) == ("-", "+")), row
            assert story_op == "*" or a == value, row
            value = c
            take_aways += story_op == "-"
            misread += (story_op, op) == ("-", "+")
        assert int(match.group(2)) == value
    assert take_aways > 100 and 0.4 < misread / take_aways < 0.6
    # Everything a reward or an evaluation reads stays correct and unchanged.
    for name, split in [("math_grpo", "train"), ("math_grpo", "test"), ("math_sft", "test"), ("code", "train")]:
        assert (sloppy / name / f"{split}.jsonl").read_bytes() == (built / name / f"{split}.jsonl").read_bytes()
    assert (sloppy / "math_sft" / "train.jsonl").read_bytes() != (built / "math_sft" / "train.jsonl").read_bytes()
    mix = {json.dumps(r) for r in _rows(sloppy, "sft_mix", "train")}
    assert all(json.dumps(r) in mix for r in _rows(sloppy, "math_sft", "train"))
    with pytest.raises(ValueError, match="slip_rate"):
        BuildConfig(out_dir=str(tmp_path / "bad"), math_sft_slip_rate=1.5)


def test_math_grpo_answers_are_correct(built):
    for split in ("train", "test"):
        for row in _rows(built, "math_grpo", split):
            assert list(row) == ["prompt", "answer"] and isinstance(row["answer"], str)
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert int(row["answer"]) == solve_story(row["prompt"][0]["content"])[0]


def test_math_test_problems_are_held_out(built):
    def keys(name: str, split: str) -> set:
        rows = _rows(built, name, split)
        contents = [r["messages"][0]["content"] if "messages" in r else r["prompt"][0]["content"] for r in rows]
        return {tuple(solve_story(c)[1]) for c in contents}

    test_keys = keys("math_sft", "test")
    assert len(test_keys) == SMALL.math_test  # pairwise distinct exercises
    assert not test_keys & keys("math_sft", "train")
    assert not test_keys & keys("math_grpo", "train")
    assert keys("math_grpo", "test") == test_keys


def test_arithmetic_difficulty_knobs():
    rng = random.Random(0)
    easy = arithmetic.ArithmeticConfig(max_operand=9, min_operations=1, max_operations=1, multiplication_probability=0)
    for problem in arithmetic.sample_problems(rng, easy, 200):
        assert len(problem.steps) == 1 and problem.steps[0][1] in "+-"
        left, _, right, result = problem.steps[0]
        assert 1 <= left <= 9 and 1 <= right <= 9 and 0 <= result <= 18
    hard = arithmetic.ArithmeticConfig(min_operations=3, max_operations=3)
    assert {len(p.steps) for p in arithmetic.sample_problems(rng, hard, 100)} == {3}
    with pytest.raises(ValueError, match="min_operations"):
        arithmetic.ArithmeticConfig(min_operations=3, max_operations=2)


def test_default_math_mixes_one_and_two_operations_and_all_operators(built):
    steps = [solve_story(r["messages"][0]["content"])[1] for r in _rows(built, "math_sft", "train")]
    assert {len(s) for s in steps} == {1, 2}
    assert {op for s in steps for _, op, _ in s} == {"+", "-", "*"}


# --- coding -----------------------------------------------------------------------------------

RUNNER = textwrap.dedent(
    """
    import json, sys
    tasks = json.load(sys.stdin)
    report = []
    for task in tasks:
        def passes(source):
            namespace = {}
            try:
                exec(source, namespace)
                for test in task["tests"]:
                    exec(test, namespace)
            except Exception:
                return False
            return True
        wrong = "def %s(*args):\\n    return None" % task["entry_point"]
        report.append([passes(task["source"]), passes(wrong)])
    print(json.dumps(report))
    """
)


def test_code_reference_solutions_pass_their_tests_and_wrong_ones_fail(built):
    tasks = []
    for split in ("train", "test"):
        for row in _rows(built, "code", split):
            assert [m["role"] for m in row["prompt"]] == ["user"] and len(row["tests"]) == coding.NUM_TESTS
            assert row["solution"].startswith("```python\n") and row["solution"].endswith("\n```")
            assert all(test.startswith(f"assert {row['entry_point']}(") for test in row["tests"])
            source = row["solution"][len("```python\n") : -len("\n```")]
            tasks.append({"source": source, "tests": row["tests"], "entry_point": row["entry_point"]})
    result = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(tasks), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report) == len(tasks)
    failures = [task for task, (good, _) in zip(tasks, report) if not good]
    assert not failures, failures[:3]
    too_lenient = [task for task, (_, wrong) in zip(tasks, report) if wrong]
    assert not too_lenient, too_lenient[:3]


def test_every_code_family_has_a_passing_reference():
    # Cover each family by construction rather than by the luck of sampling.
    rng = random.Random(0)
    families_seen = set()
    tasks = []
    while len(families_seen) < len(coding.FAMILIES):
        task = coding.sample_task(rng)
        family = next(i for i, f in enumerate(coding.FAMILIES) if f.body.split("{")[0] in task.reference_source
                      and any(n.split("_{")[0] in task.entry_point for n in f.names))
        if family not in families_seen:
            families_seen.add(family)
            tasks.append({"source": task.reference_source, "tests": list(task.tests), "entry_point": task.entry_point})
    result = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(tasks), capture_output=True, text=True, timeout=60
    )
    assert [good for good, _ in json.loads(result.stdout)] == [True] * len(tasks)


def test_code_test_prompts_are_held_out(built):
    train = {row["prompt"][0]["content"] for row in _rows(built, "code", "train")}
    test = [row["prompt"][0]["content"] for row in _rows(built, "code", "test")]
    assert len(set(test)) == len(test) == SMALL.code_test
    assert not train & set(test)


# --- preferences ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["helpful_pairs", "safety_pairs"])
def test_preference_rows_and_held_out_prompts(built, name):
    train_rows, test_rows = _rows(built, name, "train"), _rows(built, name, "test")
    for row in train_rows + test_rows:
        assert list(row) == ["prompt", "chosen", "rejected"]
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        assert row["chosen"] != row["rejected"]
    train_prompts = {row["prompt"][0]["content"] for row in train_rows}
    assert not train_prompts & {row["prompt"][0]["content"] for row in test_rows}


def test_held_out_entities_never_reach_train_prompts(built):
    held_out_people = preferences.split_items(preferences.PEOPLE, "test")
    held_out_countries = [c for c, _ in preferences.split_items(preferences.CAPITALS, "test")]
    train_text = " ".join(
        row["prompt"][0]["content"]
        for name in ("helpful_pairs", "safety_pairs", "stage2_prompts")
        for row in _rows(built, name, "train")
    )
    test_text = " ".join(
        row["prompt"][0]["content"] for name in ("helpful_pairs", "safety_pairs") for row in _rows(built, name, "test")
    )
    for entity in held_out_people + held_out_countries:
        assert entity.lower() not in train_text.lower(), entity
    assert any(entity in test_text for entity in held_out_people)  # the held-out entities are used


def test_safety_pairs_prefer_refusals_of_harmful_requests():
    rng = random.Random(0)
    pairs = [preferences.sample_safety_pair(rng, "train") for _ in range(300)]
    harmful = [p for p in pairs if p.category.endswith("/compliance")]
    benign = [p for p in pairs if p.category == "benign/hostile"]
    assert 0.2 < len(benign) / len(pairs) < 0.4
    assert all(any(p.chosen.startswith(o) for o in preferences.REFUSAL_OPENERS) for p in harmful)
    assert all(any(p.rejected.startswith(o) for o in preferences.COMPLIANCE_OPENERS) for p in harmful)
    assert not any(any(p.chosen.startswith(o) for o in preferences.REFUSAL_OPENERS) for p in benign)


def test_helpful_pairs_cover_every_rejection_kind():
    rng = random.Random(0)
    kinds = {preferences.sample_helpful_pair(rng, "train").category.split("/")[1] for _ in range(300)}
    assert kinds == {"wrong", "off_topic", "rude", "refusal"}


def test_split_items_partitions():
    items = list(range(10))
    train, test = preferences.split_items(items, "train"), preferences.split_items(items, "test")
    assert sorted(train + test) == items and test == [2, 5, 8]


# --- the SFT mix, parquet and the CLI ---------------------------------------------------------


def test_sft_mix_holds_math_code_and_chat(built):
    for split, (math, code, chat) in {
        "train": (SMALL.math_sft_train, SMALL.code_train, SMALL.chat_train),
        "test": (SMALL.math_test, SMALL.code_test, SMALL.chat_test),
    }.items():
        answers = [row["messages"][-1]["content"] for row in _rows(built, "sft_mix", split)]
        counted = (
            sum("\\boxed{" in a for a in answers),
            sum(a.startswith("```python") for a in answers),
            sum("\\boxed{" not in a and not a.startswith("```python") for a in answers),
        )
        assert counted == (math, code, chat)


def test_parquet_copies_match_jsonl(built):
    import datasets

    for name in ("math_sft", "code", "safety_pairs"):
        from_parquet = datasets.load_dataset("parquet", data_files=str(built / name / "test.parquet"), split="train")
        assert from_parquet.to_list() == _rows(built, name, "test")


def test_cli_builds_and_rejects_unknown_sizes(tmp_path, capsys):
    sizes = [f"{name}=5" for name in SMALL.__dataclass_fields__]
    assert cli_main(["build", "--out", str(tmp_path), "--seed", "3", "--no-tokenizer", "--sizes", *sizes]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["files"]["math_sft/train"]["rows"] == 5
    assert cli_main(["build", "--out", str(tmp_path), "--sizes", "math_trian=5"]) == 2
    assert "math_trian" in capsys.readouterr().err
    assert cli_main(["build", "--out", str(tmp_path), "--no-tokenizer", "--sizes", *sizes,
                     "--math-sft-slip-rate", "0.5"]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["math_sft_slip_rate"] == 0.5
    assert cli_main(["build", "--out", str(tmp_path / "bad"), "--math-sft-slip-rate", "2"]) == 2
    assert "math_sft_slip_rate" in capsys.readouterr().err
