"""`python -m alignment report <run_dir>`: PNG plots of a run's metrics and a markdown summary.

Reads every `*.jsonl` file in the run directory (one JSON record per line with a `step` key — the
GRPO trainer's metrics.jsonl, the evaluators' evals.jsonl) and, for Trainer-based stages, the
`log_history` of the newest `trainer_state.json`. Each panel plots the numeric keys matching its
pattern over steps; panels with nothing to show are skipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

PANELS = {
    "reward": r"(^|/)rewards?(/|_|$)|reward",
    "kl": r"(^|/)kl",
    "entropy": r"entropy",
    "completion_length": r"completion.*len|len.*completion",
    "eval": r"^eval",
    "loss": r"loss",
}


def read_records(run_dir: Path) -> list[dict]:
    records: list[dict] = []
    for path in sorted(run_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write: skip it, keep the rest
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    states = sorted(run_dir.glob("**/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if states:
        for entry in json.loads(states[-1].read_text()).get("log_history", []):
            if "step" in entry:
                records.append(entry)
    return records


def series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                out.setdefault(key, []).append((record["step"], float(value)))
    return {k: sorted(v) for k, v in out.items()}


def write_report(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    data = series(read_records(run_dir))
    if not data:
        raise ValueError(f"{run_dir}: no metrics found (no *.jsonl records with a step, no trainer_state.json)")
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    lines = [f"# Run report: {run_dir}", "", "| metric | first | last | steps |", "|---|---|---|---|"]
    for key in sorted(data):
        points = data[key]
        lines.append(f"| {key} | {points[0][1]:.4g} | {points[-1][1]:.4g} | {len(points)} |")
    lines.append("")
    for panel, pattern in PANELS.items():
        keys = [k for k in sorted(data) if re.search(pattern, k, re.IGNORECASE)]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys[:12]:
            steps, values = zip(*data[key])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{panel}.png", dpi=100)
        plt.close(fig)
        lines.append(f"![{panel}]({panel}.png)")
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return summary
