"""Write every shipped task dataset (and the tiny model's tokenizer) to a directory.

Layout under `out_dir` (each dataset a folder with train and test files):

    math_sft/        messages                              arithmetic, worked answers
    math_grpo/       prompt, answer                        arithmetic, prompt-only (GRPO stage 1)
    code/            prompt, tests, solution, entry_point  coding tasks (code reward, GRPO stage 1)
    helpful_pairs/   prompt, chosen, rejected              helpful reward model
    safety_pairs/    prompt, chosen, rejected              safety reward model
    sft_mix/         messages                              math + code + helpful/safety chats (SFT)
    stage2_prompts/  prompt                                helpful + harmful prompts (GRPO stage 2)
    tokenizer/       PreTrainedTokenizerFast files, trained on the train splits only
    manifest.json    seed, sizes, generator settings, and rows/columns/sha256 of every file

`prompt` is always a messages list (`[{"role": "user", "content": ...}]`); `chosen`/`rejected` are
one-message assistant lists (see preferences.py).

Determinism: every dataset draws from its own `random.Random` seeded with the string
"latentalign:<seed>:<stream>", so the output is a function of the seed and the settings alone
(Python's string seeding is stable across runs and platforms), and resizing one dataset does not
change the others. The same seed gives byte-identical JSONL files and manifest.

Held-out test splits: math test problems never share their numbers-and-operators with a train
problem, code test prompts never occur in train, and the preference/chat/stage-2 test prompts use
held-out templates and entities (preferences.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from alignment.tasks import arithmetic, coding, preferences

SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskSizes:
    """Number of rows per generated file."""

    math_sft_train: int = 5000
    """Arithmetic problems with worked answers for SFT (also in sft_mix)."""
    math_grpo_train: int = 2000
    """Prompt-only arithmetic problems for GRPO stage 1."""
    math_test: int = 200
    """Held-out arithmetic problems; math_sft/test and math_grpo/test are the same problems."""
    code_train: int = 1000
    """Coding tasks for training (code/train and, as chats, in sft_mix)."""
    code_test: int = 60
    """Held-out coding tasks (distinct prompts, none seen in training)."""
    helpful_train: int = 2000
    """Helpfulness preference pairs for training."""
    helpful_test: int = 200
    """Held-out helpfulness pairs (held-out templates and entities)."""
    safety_train: int = 2000
    """Safety preference pairs for training."""
    safety_test: int = 200
    """Held-out safety pairs (held-out templates and entities)."""
    chat_train: int = 600
    """Helpful and safety chats (prompt + chosen reply, half each) added to sft_mix/train."""
    chat_test: int = 60
    """Held-out chats added to sft_mix/test."""
    stage2_prompts_train: int = 1000
    """Helpful and safety prompts (half each) for GRPO stage 2."""
    stage2_prompts_test: int = 100
    """Held-out stage-2 prompts."""

    def __post_init__(self) -> None:
        for size_field in fields(self):
            value = getattr(self, size_field.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"size {size_field.name} must be a non-negative int, got {value!r}")

    @classmethod
    def parse_overrides(cls, items: list[str]) -> TaskSizes:
        """Sizes from ["name=N", ...] on top of the defaults; an unknown name is an error."""
        known = {size_field.name for size_field in fields(cls)}
        overrides: dict[str, int] = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or name not in known:
                raise ValueError(f"bad size {item!r}: expected NAME=N with NAME one of {sorted(known)}")
            try:
                overrides[name] = int(value)
            except ValueError:
                raise ValueError(f"bad size {item!r}: {value!r} is not an integer") from None
        return cls(**overrides)


@dataclass(frozen=True)
class BuildConfig:
    """What `build_task_files` writes."""

    out_dir: str
    """Directory the datasets, the tokenizer and manifest.json are written to."""
    seed: int = 0
    """Seed of every generator; the same seed gives the same files."""
    sizes: TaskSizes = field(default_factory=TaskSizes)
    """Rows per file."""
    arithmetic: arithmetic.ArithmeticConfig = field(default_factory=arithmetic.ArithmeticConfig)
    """Difficulty of the arithmetic problems."""
    math_sft_slip_rate: float = 0.0
    """Share of the take-away steps that the SFT math demonstrations (math_sft/train and the math of
    sft_mix/train) misread as additions, standing for the imperfect solutions of real SFT data; the gold
    answers of every prompt set and all test splits stay correct (arithmetic.misread_solution)."""
    safety_benign_share: float = 0.3
    """Share of safety pairs that are tense but benign situations rather than harmful requests."""
    parquet: bool = False
    """Also write every file as Parquet next to the JSONL."""
    tokenizer: bool = True
    """Train and save the tiny model's tokenizer under tokenizer/."""
    tokenizer_vocab_size: int = 512
    """Total vocabulary of that tokenizer, special tokens included (at most 1024)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.math_sft_slip_rate <= 1.0:
            raise ValueError(f"math_sft_slip_rate must lie in [0, 1], got {self.math_sft_slip_rate}")


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"latentalign:{seed}:{stream}")


def generate_rows(config: BuildConfig) -> dict[str, dict[str, list[dict]]]:
    """All datasets in memory: {dataset name: {split: rows}}."""
    seed, sizes = config.seed, config.sizes

    math_test = arithmetic.sample_unique_problems(_rng(seed, "math/test"), config.arithmetic, sizes.math_test)
    held_out_math = {problem.expression_key for problem in math_test}
    math_sft_train = arithmetic.sample_problems(
        _rng(seed, "math/sft_train"), config.arithmetic, sizes.math_sft_train, exclude=held_out_math
    )
    math_grpo_train = arithmetic.sample_problems(
        _rng(seed, "math/grpo_train"), config.arithmetic, sizes.math_grpo_train, exclude=held_out_math
    )

    code_test = coding.sample_tasks(_rng(seed, "code/test"), sizes.code_test, unique=True)
    code_train = coding.sample_tasks(
        _rng(seed, "code/train"), sizes.code_train, exclude_prompts={task.prompt for task in code_test}
    )

    def pairs(stream: str, split: preferences.Split, count: int, kind: str) -> list[preferences.PreferencePair]:
        rng = _rng(seed, stream)
        if kind == "helpful":
            return [preferences.sample_helpful_pair(rng, split) for _ in range(count)]
        return [preferences.sample_safety_pair(rng, split, config.safety_benign_share) for _ in range(count)]

    def helpful_and_safety(stream: str, split: preferences.Split, count: int) -> list[preferences.PreferencePair]:
        helpful = pairs(f"{stream}/helpful", split, count - count // 2, "helpful")
        safety = pairs(f"{stream}/safety", split, count // 2, "safety")
        mixed = helpful + safety
        _rng(seed, f"{stream}/shuffle").shuffle(mixed)
        return mixed

    chats = {split: helpful_and_safety(f"chat/{split}", split, getattr(sizes, f"chat_{split}")) for split in SPLITS}
    stage2 = {
        split: helpful_and_safety(f"stage2/{split}", split, getattr(sizes, f"stage2_prompts_{split}"))
        for split in SPLITS
    }

    slip_rng = _rng(seed, "math/sft_train/slips")  # its own stream: slip_rate 0 leaves every file as before
    math_sft_rows = [
        arithmetic.sft_row(p, arithmetic.misread_solution(p, slip_rng, config.math_sft_slip_rate))
        if config.math_sft_slip_rate else arithmetic.sft_row(p)
        for p in math_sft_train
    ]
    sft_mix = {
        "train": list(math_sft_rows)
        + [coding.sft_row(t) for t in code_train]
        + [preferences.chat_row(c) for c in chats["train"]],
        "test": [arithmetic.sft_row(p) for p in math_test]
        + [coding.sft_row(t) for t in code_test]
        + [preferences.chat_row(c) for c in chats["test"]],
    }
    for split in SPLITS:
        _rng(seed, f"sft_mix/{split}/shuffle").shuffle(sft_mix[split])

    return {
        "math_sft": {
            "train": math_sft_rows,
            "test": [arithmetic.sft_row(p) for p in math_test],
        },
        "math_grpo": {
            "train": [arithmetic.prompt_row(p) for p in math_grpo_train],
            "test": [arithmetic.prompt_row(p) for p in math_test],
        },
        "code": {"train": [coding.prompt_row(t) for t in code_train], "test": [coding.prompt_row(t) for t in code_test]},
        "helpful_pairs": {
            split: [preferences.pair_row(p) for p in pairs(f"helpful/{split}", split, getattr(sizes, f"helpful_{split}"),
                                                           "helpful")]
            for split in SPLITS
        },
        "safety_pairs": {
            split: [preferences.pair_row(p) for p in pairs(f"safety/{split}", split, getattr(sizes, f"safety_{split}"),
                                                           "safety")]
            for split in SPLITS
        },
        "sft_mix": sft_mix,
        "stage2_prompts": {split: [preferences.prompt_row(p) for p in stage2[split]] for split in SPLITS},
    }


def tokenizer_corpus(datasets: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Every string of the train splits (test text stays unseen, as for the model)."""
    texts: list[str] = []

    def collect(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for key in ("content", "prompt", "chosen", "rejected", "messages", "tests", "solution"):
                if key in value:
                    collect(value[key])

    for name in ("sft_mix", "helpful_pairs", "safety_pairs", "code", "stage2_prompts"):
        for row in datasets[name]["train"]:
            collect(row)
    return texts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_task_files(config: BuildConfig) -> dict:
    """Generate every dataset, write it under config.out_dir, and return the manifest (also written)."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = generate_rows(config)

    files: dict[str, dict] = {}
    for name, splits in datasets.items():
        (out_dir / name).mkdir(exist_ok=True)
        for split, rows in splits.items():
            path = out_dir / name / f"{split}.jsonl"
            _write_jsonl(path, rows)
            entry = {
                "path": str(path.relative_to(out_dir)),
                "rows": len(rows),
                "columns": list(rows[0]) if rows else [],
                "sha256": _sha256(path),
            }
            if config.parquet:
                parquet_path = path.with_suffix(".parquet")
                _write_parquet(parquet_path, rows)
                entry["parquet_path"] = str(parquet_path.relative_to(out_dir))
            files[f"{name}/{split}"] = entry

    manifest: dict = {
        "seed": config.seed,
        "sizes": asdict(config.sizes),
        "arithmetic": asdict(config.arithmetic),
        "math_sft_slip_rate": config.math_sft_slip_rate,
        "safety_benign_share": config.safety_benign_share,
        "files": files,
    }
    if config.tokenizer:
        from alignment.tokenizer import build_tokenizer  # pulls in transformers: only when asked

        tokenizer = build_tokenizer(
            tokenizer_corpus(datasets), out_dir / "tokenizer", vocab_size=config.tokenizer_vocab_size
        )
        manifest["tokenizer"] = {
            "path": "tokenizer",
            "vocab_size": len(tokenizer),
            "special_tokens": {
                "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                "roles": [token for token in tokenizer.all_special_tokens
                          if token not in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)],
            },
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
