"""CLI: python -m alignment.tasks build --out DIR --seed S [--sizes NAME=N ...] [--parquet]."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from alignment.tasks.arithmetic import ArithmeticConfig
from alignment.tasks.build import BuildConfig, TaskSizes, build_task_files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alignment.tasks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write every task dataset, the tokenizer and a manifest")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same files)")
    size_names = ", ".join(f"{f.name}={f.default}" for f in fields(TaskSizes))
    build.add_argument("--sizes", nargs="*", default=[], metavar="NAME=N", help=f"row counts; defaults: {size_names}")
    build.add_argument("--parquet", action="store_true", help="also write Parquet copies of every file")
    build.add_argument("--no-tokenizer", action="store_true", help="skip training the tokenizer")
    build.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary (<= 1024)")
    build.add_argument("--max-operand", type=int, default=ArithmeticConfig.max_operand,
                       help="largest number in +/- steps of the arithmetic problems")
    build.add_argument("--max-operations", type=int, default=ArithmeticConfig.max_operations,
                       help="most operations per arithmetic problem")
    build.add_argument("--min-operations", type=int, default=ArithmeticConfig.min_operations,
                       help="fewest operations per arithmetic problem")
    build.add_argument("--math-sft-slip-rate", type=float, default=0.0,
                       help="share of take-away steps the SFT math demonstrations misread as additions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = BuildConfig(
            out_dir=args.out,
            seed=args.seed,
            sizes=TaskSizes.parse_overrides(args.sizes),
            arithmetic=ArithmeticConfig(
                max_operand=args.max_operand, min_operations=args.min_operations, max_operations=args.max_operations
            ),
            math_sft_slip_rate=args.math_sft_slip_rate,
            parquet=args.parquet,
            tokenizer=not args.no_tokenizer,
            tokenizer_vocab_size=args.vocab_size,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifest = build_task_files(config)
    for name, entry in manifest["files"].items():
        print(f"{name:24s} {entry['rows']:6d} rows  {entry['path']}")
    if "tokenizer" in manifest:
        print(f"tokenizer: {json.dumps(manifest['tokenizer'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
