"""Per-step metrics: JSONL (`metrics.jsonl`), TensorBoard (`tensorboard/`) and a progress bar, main process only.

A line of metrics.jsonl is `{"step": N, "time": unix seconds, <name>: value, ...}`. After a resume the
steps since the last checkpoint are logged again (the file is appended to, never rewritten); readers
keep the last line of each step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in clean.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.bar is not None:
            self.bar.update(1)
            shown = {k.split("/")[-2] if k.endswith("/mean") else k: f"{clean[k]:.3g}"
                     for k in ("reward/mean", "kl", "completion/length_mean", "time/step_s") if k in clean}
            self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
