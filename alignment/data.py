"""Loading and validating the datasets the alignment stages train on.

Three row schemas, all read from local JSON / JSONL / Parquet files through `datasets.load_dataset`:

- chat (SFT):          `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...] with at
                       least one assistant turn; a system turn only first.
- preference (RM):     `prompt`, `chosen`, `rejected`, either all strings, or `prompt` a messages list
                       and `chosen`/`rejected` non-empty lists of assistant messages (TRL's explicit-prompt
                       conversational form, which the shipped generators write). The implicit-prompt form
                       (the prompt repeated inside chosen/rejected) is not accepted.
- prompt (GRPO):       `prompt` (a messages list ending in a user turn, or a string) plus the columns the
                       reward functions need (e.g. `answer`, `tests`), which must be present and non-null.

Extra columns are kept. Every row is checked after loading; a bad row raises DatasetValidationError
naming the file, the row index (0-based, in file order) and the field, e.g.
`data/train.jsonl: row 3: messages[1].role: unknown role 'bot' (expected system, user, assistant)`.
Rows that `datasets` itself cannot load (a JSON value whose type clashes with other rows, e.g. an
int `content` among strings) are located by re-reading the file with the json module, so they get
the same kind of message instead of an Arrow error.

Each file is loaded on its own (so row indices are per file) and the files are then concatenated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
TRAIN_SPLIT = "train"
EVAL_SPLIT = "test"
"""Split names of the returned DatasetDict (the names TRL's scripts use)."""

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DatasetValidationError(ValueError):
    """A data file or one of its rows does not match the expected schema."""

    def __init__(self, file: str, row: int | None, field: str | None, problem: str):
        self.file, self.row, self.field, self.problem = file, row, field, problem
        where = [file] + ([f"row {row}"] if row is not None else []) + ([field] if field else [])
        super().__init__(": ".join(where + [problem]))


@dataclass
class DataConfig:
    """Where a stage's data comes from and how it is split (a recipe's `data:` section)."""

    train_files: list[str]
    """Local .json/.jsonl/.parquet files with the training rows, concatenated in order."""
    eval_files: list[str] = field(default_factory=list)
    """Files with the eval rows; when empty, eval_fraction of the training rows is held out instead."""
    eval_fraction: float = 0.0
    """Share of the training rows held out for eval when eval_files is empty (0 means no eval split)."""
    split_seed: int = 0
    """Seed of the random train/eval split made from eval_fraction."""
    max_train_samples: int | None = None
    """Keep only the first N training rows (after the split); None keeps all."""
    max_eval_samples: int | None = None
    """Keep only the first N eval rows; None keeps all."""

    def __post_init__(self) -> None:
        if isinstance(self.train_files, str) or isinstance(self.eval_files, str):
            raise ValueError("train_files and eval_files must be lists of paths, not a single string")
        if not self.train_files:
            raise ValueError("train_files is empty")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.eval_files and self.eval_fraction:
            raise ValueError("give either eval_files or eval_fraction, not both")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")


# ---------------------------------------------------------------------------------------------
# Row checks. Each takes a row (a dict of column -> value) and raises _RowProblem(field, problem).
# ---------------------------------------------------------------------------------------------


class _RowProblem(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _require(row: dict, column: str) -> Any:
    value = row.get(column)
    if value is None:
        raise _RowProblem(column, "missing (column absent or null)")
    return value


def check_messages(messages: Any, field: str, allowed_roles: Sequence[str] = ROLES) -> None:
    """A non-empty list of {"role", "content"} dicts with known roles and string content."""
    if not isinstance(messages, list):
        raise _RowProblem(field, f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise _RowProblem(field, "empty list of messages")
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise _RowProblem(where, f"expected a message dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise _RowProblem(f"{where}.role", "missing")
        if role not in allowed_roles:
            raise _RowProblem(f"{where}.role", f"unknown role {role!r} (expected {', '.join(allowed_roles)})")
        if content is None:
            raise _RowProblem(f"{where}.content", "missing")
        if not isinstance(content, str):
            raise _RowProblem(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if role == "system" and index != 0:
            raise _RowProblem(f"{where}.role", "a system message may only come first")


def check_chat_row(row: dict) -> None:
    messages = _require(row, "messages")
    check_messages(messages, "messages")
    if not any(message["role"] == "assistant" for message in messages):
        raise _RowProblem("messages", "no assistant turn (nothing to train on)")


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise _RowProblem("prompt", "empty string")
        return
    check_messages(prompt, "prompt")
    if prompt[-1]["role"] != "user":
        raise _RowProblem(f"prompt[{len(prompt) - 1}].role", "the prompt must end with a user turn")


def check_preference_row(row: dict) -> None:
    prompt, chosen, rejected = (_require(row, column) for column in ("prompt", "chosen", "rejected"))
    _check_prompt(prompt)
    conversational = not isinstance(prompt, str)
    for column, reply in (("chosen", chosen), ("rejected", rejected)):
        if conversational:
            if isinstance(reply, str):
                raise _RowProblem(column, "a string, but prompt is a messages list (use one form for all three)")
            check_messages(reply, column, allowed_roles=("assistant",))
        elif not isinstance(reply, str):
            raise _RowProblem(column, f"expected a string like prompt, got {type(reply).__name__}")
        elif not reply:
            raise _RowProblem(column, "empty string")
    if chosen == rejected:
        raise _RowProblem("rejected", "identical to chosen (the pair carries no preference)")


def prompt_row_checker(required_columns: Sequence[str] = ()) -> Callable[[dict], None]:
    """Check for prompt datasets: `prompt` plus the given reward columns, present and non-null."""

    def check(row: dict) -> None:
        _check_prompt(_require(row, "prompt"))
        for column in required_columns:
            _require(row, column)

    return check


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------


def _builder(path: str) -> str:
    builder = _BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise DatasetValidationError(path, None, None, f"unsupported file type (expected one of {sorted(_BUILDERS)})")
    return builder


def _raw_json_rows(path: str) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON Lines file, or of a JSON file holding a list of rows, with the json module."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from enumerate(json.loads(stripped))
        return
    row = 0
    for line in text.splitlines():
        if line.strip():
            try:
                yield row, json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetValidationError(path, row, None, f"invalid JSON: {error}") from None
            row += 1


def _check_rows(path: str, rows: Iterator[tuple[int, Any]], check_row: Callable[[dict], None]) -> None:
    for index, row in rows:
        if not isinstance(row, dict):
            raise DatasetValidationError(path, index, None, f"expected an object per row, got {type(row).__name__}")
        try:
            check_row(row)
        except _RowProblem as problem:
            raise DatasetValidationError(path, index, problem.field, problem.problem) from None


def load_file(path: str, check_row: Callable[[dict], None]):
    """One file as a `datasets.Dataset`, every row checked."""
    import datasets

    if not Path(path).is_file():
        raise DatasetValidationError(path, None, None, "no such file")
    builder = _builder(path)
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(path)], split="train")
    except Exception as error:  # noqa: BLE001 - re-raised below unless a row-level cause is found
        if builder == "json":
            _check_rows(path, _raw_json_rows(path), check_row)
        raise DatasetValidationError(path, None, None, f"datasets could not load it: {error}") from error

    columns = dataset.column_names
    for start in range(0, len(dataset), 1024):
        batch = dataset[start : start + 1024]
        size = len(batch[columns[0]]) if columns else 0
        _check_rows(path, ((start + i, {c: batch[c][i] for c in columns}) for i in range(size)), check_row)
    if len(dataset) == 0:
        raise DatasetValidationError(path, None, None, "no rows")
    return dataset


def load_files(paths: Sequence[str], check_row: Callable[[dict], None]):
    """Several files, each loaded and checked, concatenated in order."""
    import datasets

    parts = [load_file(str(path), check_row) for path in paths]
    for path, part in zip(paths[1:], parts[1:]):
        if part.features != parts[0].features:
            raise DatasetValidationError(
                str(path), None, None,
                f"columns/types {dict(part.features)} differ from those of {paths[0]}: {dict(parts[0].features)}",
            )
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_splits(config: DataConfig, check_row: Callable[[dict], None]):
    """DatasetDict with TRAIN_SPLIT and, when the config asks for one, EVAL_SPLIT."""
    import datasets

    train = load_files(config.train_files, check_row)
    evaluation = None
    if config.eval_files:
        evaluation = load_files(config.eval_files, check_row)
    elif config.eval_fraction > 0:
        split = train.train_test_split(test_size=config.eval_fraction, seed=config.split_seed)
        train, evaluation = split["train"], split["test"]

    if config.max_train_samples is not None:
        train = train.select(range(min(config.max_train_samples, len(train))))
    splits = {TRAIN_SPLIT: train}
    if evaluation is not None:
        if config.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(config.max_eval_samples, len(evaluation))))
        splits[EVAL_SPLIT] = evaluation
    return datasets.DatasetDict(splits)


def load_chat_dataset(config: DataConfig):
    """Chat (`messages`) data for SFT."""
    return load_splits(config, check_chat_row)


def load_preference_dataset(config: DataConfig):
    """Preference (`prompt`, `chosen`, `rejected`) data for reward models."""
    return load_splits(config, check_preference_row)


def load_prompt_dataset(config: DataConfig, required_columns: Sequence[str] = ()):
    """Prompt data for GRPO; `required_columns` are what the reward functions read (e.g. "answer")."""
    return load_splits(config, prompt_row_checker(required_columns))
