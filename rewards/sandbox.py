"""Run untrusted Python against assert tests in a jailed, resource-limited child process.

`run_in_sandbox(program, tests, config)` writes the job to a fresh private directory, starts
`_sandbox_launcher.py` (root: namespaces, read-only view, rlimits, unprivileged uid; see its
docstring for each part of the jail and why) which execs `_sandbox_harness.py` (the program and
its tests), waits at most `wall_timeout_s` and then kills every process of the run's uid and
waits until none is left (`_stop_run`). Output goes to a file capped by
RLIMIT_FSIZE, so a program that prints gigabytes is killed by SIGXFSZ at the cap, not at the
timeout.

The jail needs root (CAP_SYS_ADMIN, as in the training containers). Without it the run fails with
`SandboxUnavailableError` rather than executing untrusted code unjailed.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rewards import _sandbox_harness, _sandbox_launcher

_PYTHON_MOUNT = ".python"
_OUTPUT_FILE = "output.log"
_RESULTS_READ_CAP = 1 << 16
_STOP_GRACE_S = 5.0


class SandboxUnavailableError(RuntimeError):
    """The jail could not be built here (not root, no namespaces): code is not run at all."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run."""

    wall_timeout_s: float = 10.0
    """Wall-clock seconds before the whole run (every process it forked) is killed."""
    cpu_time_s: int = 5
    """RLIMIT_CPU of each process, in CPU seconds."""
    memory_mb: int = 1024
    """RLIMIT_AS of each process (address space), in MiB."""
    output_cap_bytes: int = 1 << 20
    """RLIMIT_FSIZE: the most bytes any file (the captured stdout/stderr included) may reach."""
    max_processes: int = 16
    """RLIMIT_NPROC for the run's own uid: processes and threads it may have at once."""
    max_open_files: int = 64
    """RLIMIT_NOFILE of each process."""
    uid_range: tuple[int, int] = (2_000_000, 2_999_999)
    """Unprivileged uids to draw each run's uid/gid from; uids no account on the host uses."""
    base_dir: str | None = None
    """Where the private run directories are created (default: the system temp dir)."""
    python: str | None = None
    """Interpreter for the program (default: this one); only its standard library is available."""


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did."""

    passed: int
    """Tests whose asserts held."""
    total: int
    """Tests given."""
    status: str
    """'ok' (exited 0), 'timeout' (killed at the wall clock), 'cpu_limit' (killed by RLIMIT_CPU),
    'crashed' (another non-zero exit or signal), 'program_error' (the program raised before any
    test ran), or 'no_program' (the completion had no code block; set by the code reward)."""
    exit_code: int | None
    """Exit status (128+N for signal N); None when killed at the timeout."""
    output: str
    """The first `output_cap_bytes` of stdout+stderr."""
    duration_s: float
    """Wall-clock seconds of the run."""
    uid: int
    """The uid the program ran as (no process of it survives the run)."""

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


def _interpreter(config: SandboxConfig) -> tuple[Path, Path]:
    """(prefix, interpreter path relative to the prefix) of the Python the program runs under."""
    if config.python is None:
        executable, prefix = Path(sys.executable).resolve(), Path(sys.base_prefix).resolve()
    else:
        executable = Path(config.python).resolve()
        prefix = executable.parent.parent
    try:
        return prefix, executable.relative_to(prefix)
    except ValueError:
        raise ValueError(f"sandbox interpreter {executable} does not lie under its prefix {prefix}") from None


def _free_uid(uid_range: tuple[int, int]) -> int:
    """A random uid of the range that no account has and no process runs as."""
    draw = random.SystemRandom()
    for _ in range(100):
        uid = draw.randint(*uid_range)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if not processes_of(uid):
                return uid
    raise RuntimeError(f"no free uid found in the sandbox uid range {uid_range}")


def _limits(config: SandboxConfig) -> dict[str, int]:
    return {
        "RLIMIT_CPU": config.cpu_time_s,
        "RLIMIT_AS": config.memory_mb << 20,
        "RLIMIT_FSIZE": config.output_cap_bytes,
        "RLIMIT_NPROC": config.max_processes,
        "RLIMIT_NOFILE": config.max_open_files,
        "RLIMIT_CORE": 0,
    }


def _read_untrusted(path: Path, cap: int) -> str:
    """At most `cap` bytes of a file the sandboxed program could have replaced: read as root, so a
    symlink (to a secret) or a FIFO (to hang us) there is refused, only a regular file is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return f.read(cap).decode(errors="replace")


def _count_results(results_file: Path, total: int) -> tuple[int, bool]:
    """(tests passed, whether the program itself raised) from the harness's results file."""
    lines = _read_untrusted(results_file, _RESULTS_READ_CAP).splitlines()
    passed = {line.split()[1] for line in lines if line.startswith("pass ") and len(line.split()) == 2}
    passed &= {str(i) for i in range(total)}
    program_error = any(line.startswith("program_error") for line in lines)
    return len(passed), program_error


def run_in_sandbox(program: str, tests: list[str], config: SandboxConfig | None = None) -> SandboxResult:
    """Run `program`, then each assert statement in `tests`, in a fresh jail; count passing tests."""
    config = config or SandboxConfig()
    prefix, interpreter = _interpreter(config)
    uid = _free_uid(config.uid_range)
    run_dir = Path(tempfile.mkdtemp(prefix="latentalign-sandbox-", dir=config.base_dir))
    started = time.monotonic()
    try:
        shutil.copyfile(_sandbox_harness.__file__, run_dir / "harness.py")
        (run_dir / "job.json").write_text(json.dumps({"program": program, "tests": list(tests)}))
        for path in (run_dir, run_dir / "job.json"):
            os.chown(path, uid, uid)
        run_dir.chmod(0o700)
        python_in_jail = str(run_dir / _PYTHON_MOUNT / interpreter)
        job = {
            "dir": str(run_dir),
            "uid": uid,
            "python_prefix": str(prefix),
            "python_mount": _PYTHON_MOUNT,
            "limits": _limits(config),
            "argv": [python_in_jail, "-I", "-S", "-B", "harness.py"],
            # The interpreter may have an absolute RUNPATH to a directory the uid cannot reach.
            "env": {"LD_LIBRARY_PATH": str(run_dir / _PYTHON_MOUNT / "lib"), "TMPDIR": str(run_dir),
                    "HOME": str(run_dir), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        }
        # Read back through our own descriptor: the program may replace the file's name, not our inode.
        with open(run_dir / _OUTPUT_FILE, "w+b") as output, tempfile.TemporaryFile() as launch_errors:
            job["error_fd"] = launch_errors.fileno()
            launcher = subprocess.Popen(
                [sys.executable, "-I", "-S", _sandbox_launcher.__file__, json.dumps(job)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=(launch_errors.fileno(),),
            )
            try:
                exit_code: int | None = launcher.wait(timeout=config.wall_timeout_s)
            except subprocess.TimeoutExpired:
                exit_code = None
                _stop_run(launcher, uid)
            duration = time.monotonic() - started
            launch_errors.seek(0)
            launch_error = launch_errors.read(_RESULTS_READ_CAP).decode(errors="replace").strip()
            output.seek(0)
            output_text = output.read(config.output_cap_bytes).decode(errors="replace")
        if launch_error:
            raise SandboxUnavailableError(f"could not run the code sandbox: {launch_error}")
        passed, program_error = _count_results(run_dir / "results.txt", len(tests))
        if exit_code is None:
            status = "timeout"
        elif program_error:
            status = "program_error"
        elif exit_code == 128 + signal.SIGXCPU:
            status = "cpu_limit"
        elif exit_code != 0:
            status = "crashed"
        else:
            status = "ok"
        return SandboxResult(passed, len(tests), status, exit_code, output_text, duration, uid)
    finally:
        _remove_run_dir(run_dir)


def processes_of(uid: int) -> list[int]:
    """Pids of the host's processes whose real uid is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                uid_line = next(line for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue  # the process exited while we looked
        if int(uid_line.split()[1]) == uid:
            pids.append(int(entry))
    return pids


def _kill_uid(uid: int) -> None:
    subprocess.run([sys.executable, "-I", "-S", _sandbox_launcher.__file__, "--kill-uid", str(uid)],
                   check=True, timeout=_STOP_GRACE_S)


def _stop_run(launcher: subprocess.Popen, uid: int) -> None:
    """After a timeout: kill every process of the run and wait until none is left.

    The run's processes are killed first (all of them run as `uid`), so that the launcher reaps
    its child and exits by itself: killing the launcher first would orphan the jail's pid 1 to the
    host's init, which may take its time to reap it. The launcher's process group is killed only
    if it does not exit (a timeout before the child had dropped to `uid`).
    """
    _kill_uid(uid)
    try:
        launcher.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    deadline = time.monotonic() + _STOP_GRACE_S
    while leftovers := processes_of(uid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox processes {leftovers} of uid {uid} survived SIGKILL")
        _kill_uid(uid)
        time.sleep(0.01)


def _remove_run_dir(run_dir: Path) -> None:
    # The jail's own bind mounts lived in its mount namespace, so this is a plain directory again.
    shutil.rmtree(run_dir, ignore_errors=True)
