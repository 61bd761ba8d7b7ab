"""Shipped synthetic task generators (no dataset hub is reachable from our machines).

One module per task family: `arithmetic` (word problems with worked answers), `coding` (small
functions with assert tests), `preferences` (helpful and safety preference pairs). `build` writes
them all to disk as JSONL (and Parquet) with a manifest; the CLI is

    python -m alignment.tasks build --out DIR --seed S [--sizes NAME=N ...]

The generators use only the standard library, so importing this package is cheap.
"""
