"""Unprivileged half of the code sandbox: run the program, then each test, and record pass/fail.

Runs inside the jail (`_sandbox_launcher.py`) as `python -I -S _sandbox_harness.py` with the sandbox
directory as cwd, so it may use the standard library only. It reads `job.json` (the program and the
tests) and appends one line per test to `results.txt` as soon as that test finishes, so the tests
that passed before a later test hangs or crashes the process still count.

The program runs with `__name__ == "__solution__"`: a completion's `if __name__ == "__main__":` demo
(often reading stdin, which is /dev/null here) is not part of what is scored. The tests run one by
one in the program's namespace, each in its own try: a failing assert does not stop the others.

This records honest results; it does not defend against a program written to forge them (it runs
in the same process and could rewrite `results.txt`). The jail limits what such a program can do to
the host, not what it can claim about itself.
"""

import json
import os
import sys
import traceback

RESULTS_FILE = "results.txt"


def main() -> None:
    with open("job.json") as f:
        job = json.load(f)
    os.remove("job.json")
    results = open(RESULTS_FILE, "w", buffering=1)
    namespace = {"__name__": "__solution__"}
    try:
        exec(compile(job["program"], "solution.py", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - SystemExit from the program is a failure too
        results.write(f"program_error {type(error).__name__}\n")
        traceback.print_exc(file=sys.stderr)  # into the captured output, for whoever debugs a score
        return
    for index, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"<test {index}>", "exec"), namespace)
        except BaseException as error:  # noqa: BLE001
            results.write(f"fail {index} {type(error).__name__}\n")
            print(f"test {index} failed: {type(error).__name__}: {error}", file=sys.stderr)
        else:
            results.write(f"pass {index}\n")


if __name__ == "__main__":
    main()
