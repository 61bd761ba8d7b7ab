"""Command line.

    python -m alignment <recipe.yaml> [dotted.key=value ...]     run one stage (sft, rm, grpo)
    accelerate launch [--config_file recipes/accelerate/<x>.yaml] -m alignment <recipe.yaml> [...]
    python -m alignment validate <recipe.yaml> ... [--no-check-paths]
    python -m alignment report <run_dir>                         PNG plots + summary.md
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from alignment.recipes import RecipeError, load_recipe, run_recipe

    try:
        if argv[:1] == ["report"]:
            parser = argparse.ArgumentParser(prog="python -m alignment report")
            parser.add_argument("run_dir")
            args = parser.parse_args(argv[1:])
            from alignment.report import write_report

            summary = write_report(args.run_dir)
            print(f"wrote {summary}")
            return 0
        if argv[:1] == ["validate"]:
            parser = argparse.ArgumentParser(prog="python -m alignment validate")
            parser.add_argument("recipes", nargs="+")
            parser.add_argument("--no-check-paths", action="store_true",
                                help="skip the existence check of data/model paths (chained recipes)")
            args = parser.parse_args(argv[1:])
            for path in args.recipes:
                stage, _ = load_recipe(path, check_paths=not args.no_check_paths)
                print(f"ok  {path}  ({stage})")
            return 0
        if not argv or argv[0].startswith("-"):
            print(__doc__, file=sys.stderr)
            return 2
        run_recipe(argv[0], argv[1:])
        return 0
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
