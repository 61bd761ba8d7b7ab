"""Loading chat / preference / prompt datasets from local files, splits, and row-level validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.data import (
    EVAL_SPLIT,
    TRAIN_SPLIT,
    DataConfig,
    DatasetValidationError,
    load_chat_dataset,
    load_preference_dataset,
    load_prompt_dataset,
)
from alignment.tasks.build import BuildConfig, TaskSizes, build_task_files


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


GOOD_CHATS = [chat(f"question {i}", f"answer {i}") for i in range(20)]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --- loading and splitting -------------------------------------------------------------------


def test_loads_jsonl_json_and_parquet_alike(tmp_path):
    json_array = tmp_path / "b.json"  # a JSON file holding a list of rows
    json_array.write_text(json.dumps(GOOD_CHATS[10:15]))
    files = [
        write_jsonl(tmp_path / "a.jsonl", GOOD_CHATS[:10]),
        str(json_array),
        write_parquet(tmp_path / "c.parquet", GOOD_CHATS[15:]),
    ]
    dataset = load_chat_dataset(DataConfig(train_files=files))
    assert list(dataset) == [TRAIN_SPLIT]
    assert dataset[TRAIN_SPLIT].to_list() == GOOD_CHATS  # files concatenated in order


def test_eval_files_and_sample_caps(tmp_path):
    config = DataConfig(
        train_files=[write_jsonl(tmp_path / "train.jsonl", GOOD_CHATS)],
        eval_files=[write_jsonl(tmp_path / "eval.jsonl", GOOD_CHATS[:5])],
        max_train_samples=7,
        max_eval_samples=3,
    )
    dataset = load_chat_dataset(config)
    assert dataset[TRAIN_SPLIT].to_list() == GOOD_CHATS[:7]
    assert dataset[EVAL_SPLIT].to_list() == GOOD_CHATS[:3]


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", GOOD_CHATS)

    def split(seed: int):
        dataset = load_chat_dataset(DataConfig(train_files=[path], eval_fraction=0.25, split_seed=seed))
        return [json.dumps(r) for r in dataset[TRAIN_SPLIT]], [json.dumps(r) for r in dataset[EVAL_SPLIT]]

    train, evaluation = split(0)
    assert len(evaluation) == 5 and len(train) == 15 and not set(train) & set(evaluation)
    assert sorted(train + evaluation) == sorted(json.dumps(r) for r in GOOD_CHATS)
    assert split(0) == (train, evaluation)
    assert split(1)[1] != evaluation


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="eval_fraction"):
        DataConfig(train_files=["x.jsonl"], eval_fraction=1.5)
    with pytest.raises(ValueError, match="not both"):
        DataConfig(train_files=["x.jsonl"], eval_files=["y.jsonl"], eval_fraction=0.1)
    with pytest.raises(ValueError, match="lists of paths"):
        DataConfig(train_files="x.jsonl")
    with pytest.raises(TypeError, match="train_file"):
        DataConfig(train_file=["x.jsonl"])  # an unknown recipe key fails by name


def test_generated_task_files_load_through_the_validating_loaders(tmp_path):
    sizes = TaskSizes(**{name: 8 for name in TaskSizes.__dataclass_fields__})
    build_task_files(BuildConfig(out_dir=str(tmp_path), seed=0, sizes=sizes, parquet=True, tokenizer=False))

    def files(name: str, ext: str = "jsonl") -> dict:
        return {"train_files": [str(tmp_path / name / f"train.{ext}")], "eval_files": [str(tmp_path / name / f"test.{ext}")]}

    for name in ("sft_mix", "math_sft"):
        assert load_chat_dataset(DataConfig(**files(name)))[EVAL_SPLIT].num_rows == (8 * 3 if name == "sft_mix" else 8)
    for name in ("helpful_pairs", "safety_pairs"):
        for ext in ("jsonl", "parquet"):
            assert load_preference_dataset(DataConfig(**files(name, ext)))[TRAIN_SPLIT].num_rows == 8
    math = load_prompt_dataset(DataConfig(**files("math_grpo")), required_columns=["answer"])
    assert math[TRAIN_SPLIT].column_names == ["prompt", "answer"]
    code = load_prompt_dataset(DataConfig(**files("code", "parquet")), required_columns=["tests"])
    assert isinstance(code[EVAL_SPLIT][0]["tests"], list)
    load_prompt_dataset(DataConfig(**files("stage2_prompts")))


# --- validation errors name the file, the row and the field ----------------------------------


def _error(tmp_path: Path, rows: list, loader=load_chat_dataset, name: str = "data.jsonl", **kwargs):
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(DatasetValidationError) as caught:
        loader(DataConfig(train_files=[path]), **kwargs)
    error = caught.value
    assert error.file == path and path in str(error)
    return error


@pytest.mark.parametrize(
    ("bad_row", "field", "problem"),
    [
        ({"text": "no messages here"}, "messages", "missing"),
        ({"messages": []}, "messages", "empty"),
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}, "messages[0].role", "missing"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0].content", "missing"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "messages[1].role",
         "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
         "messages[1].content", "expected a string, got int"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant turn"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]}, "messages[1].role", "system message"),
        ({"messages": "user: hi"}, "messages", "expected a list"),
    ],
)
def test_malformed_chat_row_is_named(tmp_path, bad_row, field, problem):
    error = _error(tmp_path, GOOD_CHATS[:3] + [bad_row] + GOOD_CHATS[3:5])
    assert (error.row, error.field) == (3, field)
    assert problem in error.problem
    assert f"row 3: {field}: " in str(error)


def test_type_errors_are_found_whether_or_not_arrow_can_load_the_file(tmp_path):
    # All-int content loads into Arrow (caught after loading); an int among strings does not (caught by the re-read).
    uniform = [{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]}] * 2
    error = _error(tmp_path, uniform, name="uniform.jsonl")
    assert (error.row, error.field) == (0, "messages[0].content")
    mixed = GOOD_CHATS[:2] + [{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}]
    error = _error(tmp_path, mixed, name="mixed.jsonl")
    assert (error.row, error.field) == (2, "messages[0].content")


def test_parquet_row_errors_are_named(tmp_path):
    rows = GOOD_CHATS[:4] + [{"messages": [{"role": "user", "content": "q"}, {"role": "critic", "content": "a"}]}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DatasetValidationError, match=r"bad\.parquet: row 4: messages\[1\]\.role: unknown role"):
        load_chat_dataset(DataConfig(train_files=[path]))


def test_the_failing_file_is_named_among_several(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", GOOD_CHATS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_CHATS[0], {"messages": None}])
    with pytest.raises(DatasetValidationError) as caught:
        load_chat_dataset(DataConfig(train_files=[good], eval_files=[bad]))
    assert (caught.value.file, caught.value.row, caught.value.field) == (bad, 1, "messages")


PAIR = {
    "prompt": [{"role": "user", "content": "Is the sky blue?"}],
    "chosen": [{"role": "assistant", "content": "Yes."}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"rejected": None}, "rejected", "missing"),
        ({"chosen": [{"role": "user", "content": "Yes."}]}, "chosen[0].role", "unknown role 'user'"),
        ({"rejected": PAIR["chosen"]}, "rejected", "identical to chosen"),
        ({"prompt": [{"role": "assistant", "content": "Hi"}]}, "prompt[0].role", "end with a user turn"),
        ({"chosen": []}, "chosen", "empty"),
    ],
)
def test_malformed_preference_row_is_named(tmp_path, change, field, problem):
    error = _error(tmp_path, [PAIR, PAIR, {**PAIR, **change}], loader=load_preference_dataset)
    assert (error.row, error.field) == (2, field) and problem in error.problem


def test_string_preference_rows_load_and_mixed_forms_are_rejected(tmp_path):
    strings = {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."}
    path = write_jsonl(tmp_path / "strings.jsonl", [strings] * 3)
    assert load_preference_dataset(DataConfig(train_files=[path]))[TRAIN_SPLIT].num_rows == 3
    error = _error(tmp_path, [{**PAIR, "chosen": [{"role": "assistant", "content": 5}]}], loader=load_preference_dataset)
    assert (error.row, error.field) == (0, "chosen[0].content")


def test_prompt_dataset_requires_the_reward_columns(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(3)]
    rows.append({"prompt": [{"role": "user", "content": "q3"}]})
    error = _error(tmp_path, rows, loader=load_prompt_dataset, required_columns=["answer"])
    assert (error.row, error.field) == (3, "answer")
    error = _error(tmp_path, rows[:3], loader=load_prompt_dataset, name="no_tests.jsonl", required_columns=["tests"])
    assert (error.row, error.field) == (0, "tests")


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetValidationError, match="no such file"):
        load_chat_dataset(DataConfig(train_files=[str(tmp_path / "missing.jsonl")]))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DatasetValidationError, match="unsupported file type"):
        load_chat_dataset(DataConfig(train_files=[str(csv)]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD_CHATS[0]) + "\n{not json\n")
    with pytest.raises(DatasetValidationError, match=r"broken\.jsonl: row 1: invalid JSON"):
        load_chat_dataset(DataConfig(train_files=[str(broken)]))
