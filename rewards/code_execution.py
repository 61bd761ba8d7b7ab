"""`code`: the share of a sample's assert tests that the completion's program passes in the sandbox.

The program is the completion's last ```python fenced block (a bare ``` block when there is no
```python one); the tests are the `tests` column, a list of assert statements per sample. Each
sample runs in its own jail (`rewards.sandbox`), up to `max_workers` at once; the threads here only
wait on those child processes. A completion with no code block scores 0.0; a row with no tests
scores None (the reward does not apply). A program that crashes, times out or breaks a limit keeps
the tests it passed before that. Samples of one group often repeat a program word for word: within a
batch each distinct (program, tests) pair runs once and its result is shared (`dedupe=False` runs every
sample, for programs whose outcome is meant to vary between runs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from rewards.registry import reward
from rewards.sandbox import SandboxConfig, SandboxResult, run_in_sandbox

_FENCED_BLOCK = re.compile(r"```([A-Za-z0-9_+-]*)[^\S\n]*\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str | None:
    """The last ```python block of the completion (else its last untagged ``` block), or None."""
    blocks = _FENCED_BLOCK.findall(completion)
    for wanted in (("python", "py", "python3"), ("",)):
        tagged = [body for tag, body in blocks if tag.lower() in wanted]
        if tagged:
            return tagged[-1]
    return None


@reward("code")
class CodeExecution:
    """Pass rate of the completion's program against the row's assert tests, run jailed."""

    def __init__(
        self,
        max_workers: int = 4,
        wall_timeout_s: float = 10.0,
        cpu_time_s: int = 5,
        memory_mb: int = 1024,
        output_cap_bytes: int = 1 << 20,
        max_processes: int = 16,
        base_dir: str | None = None,
        dedupe: bool = True,
    ) -> None:
        """`max_workers`: sandboxes run at once; `dedupe`: run each distinct (program, tests) pair of a
        batch once; the rest are the `SandboxConfig` fields of each run."""
        self.max_workers = max_workers
        self.dedupe = dedupe
        self.sandbox = replace(
            SandboxConfig(), wall_timeout_s=wall_timeout_s, cpu_time_s=cpu_time_s, memory_mb=memory_mb,
            output_cap_bytes=output_cap_bytes, max_processes=max_processes, base_dir=base_dir,
        )
        self.last_results: list[SandboxResult | None] = []
        """The sandbox runs behind the latest batch's scores (None where nothing ran), for logging."""

    def _run(self, job: tuple[str, tuple[str, ...]]) -> SandboxResult:
        program, tests = job
        return run_in_sandbox(program, list(tests), self.sandbox)

    def __call__(self, prompts: Sequence, completions: Sequence[str], tests: Sequence[Sequence[str] | None]) -> list[float | None]:
        if len(tests) != len(completions):
            raise ValueError(f"{len(tests)} test lists for {len(completions)} completions")
        results: list[SandboxResult | None] = [None] * len(completions)
        jobs: list[tuple[str, tuple[str, ...]]] = []  # what runs in the sandbox, in order
        job_of_sample: dict[int, int] = {}
        job_index: dict[tuple[str, tuple[str, ...]], int] = {}
        for i, (completion, sample_tests) in enumerate(zip(completions, tests)):
            if not sample_tests:
                continue
            program = extract_program(completion)
            if program is None:
                results[i] = SandboxResult(0, len(sample_tests), "no_program", None, "", 0.0, -1)
                continue
            job = (program, tuple(sample_tests))
            if self.dedupe and job in job_index:
                job_of_sample[i] = job_index[job]
                continue
            job_index[job] = job_of_sample[i] = len(jobs)
            jobs.append(job)
        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="sandbox") as pool:
            ran = list(pool.map(self._run, jobs))
        for i, j in job_of_sample.items():
            results[i] = ran[j]
        self.last_results = results
        return [None if result is None else result.pass_rate for result in results]
