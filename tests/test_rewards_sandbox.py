"""The code sandbox contains hostile programs: each is scored 0, ends within seconds, leaves the host as it was.

Every containment test has a control showing that the same action works outside the jail (or that
the harmless twin works inside it), so a test would fail if the jail stopped doing its part.
"""

import os
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rewards import SandboxConfig, SandboxUnavailableError, call_reward, get_reward, run_in_sandbox
from rewards.sandbox import processes_of

WALL_TIMEOUT_S = 3.0

# The jail needs root (namespaces, mounts, setuid). As root, a jail that cannot be built fails these
# tests; only a non-root run skips them.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the code sandbox needs root (CAP_SYS_ADMIN)")


@pytest.fixture
def config():
    # Run dirs must be traversable by the sandbox uid: pytest's own tmp dirs are 0700.
    base = Path(tempfile.mkdtemp(prefix="rewards-sandbox-test-"))
    base.chmod(0o711)
    yield SandboxConfig(wall_timeout_s=WALL_TIMEOUT_S, cpu_time_s=2, memory_mb=512,
                        output_cap_bytes=64 * 1024, max_processes=16, base_dir=str(base))
    leftovers = list(base.iterdir())
    shutil.rmtree(base)
    assert not leftovers, f"run dirs left behind: {leftovers}"


def assert_host_untouched(result):
    assert processes_of(result.uid) == [], "a sandbox process survived the run"


def test_a_correct_program_passes_and_may_use_its_own_dir(config):
    program = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('kept')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"  # TMPDIR points into the run dir
        "    f.write(b'x')\n"
        "def square(x):\n    return x * x\n"
    )
    tests = ["assert square(3) == 9", "assert open('scratch.txt').read() == 'kept'", "assert os.getuid() != 0",
             "assert square(2) == 5"]
    result = run_in_sandbox(program, tests, config)
    assert (result.passed, result.total, result.status) == (3, 4, "ok")
    assert_host_untouched(result)


def test_network_is_unreachable_even_on_loopback(config):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n"
    try:
        exec(program, {})  # control: outside the jail the connection is made
        listener.accept()[0].close()
        result = run_in_sandbox(program, ["assert True"], config)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert (result.passed, result.status) == (0, "program_error")
    assert result.duration_s < WALL_TIMEOUT_S
    assert_host_untouched(result)


def test_writes_outside_the_run_dir_fail(config, tmp_path):
    outside = Path(tempfile.mkdtemp(prefix="rewards-sandbox-outside-"))
    try:
        outside.chmod(0o777)  # file permissions alone would let any uid write here
        target = outside / "escaped.txt"
        program = f"open({str(target)!r}, 'w').write('escaped')\n"
        result = run_in_sandbox(program, ["assert True"], config)
        assert not target.exists()
        assert (result.passed, result.status) == (0, "program_error")
        assert "Read-only file system" in result.output
        # control: the harmless twin, writing into its own dir, passes.
        assert run_in_sandbox("open('inside.txt', 'w').write('ok')\n", ["assert True"], config).passed == 1
    finally:
        shutil.rmtree(outside)
    assert_host_untouched(result)


def test_fork_bomb_is_capped_and_killed(config):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    result = run_in_sandbox(program, ["assert True"], config)
    assert time.monotonic() - started < WALL_TIMEOUT_S + 5
    assert (result.passed, result.status) == (0, "timeout")
    assert_host_untouched(result)


def test_fork_limit_binds_before_the_timeout(config):
    # Counting how many forks succeed shows RLIMIT_NPROC binding (a root child would not be limited).
    program = (
        "import os, time\nchildren = 0\n"
        "try:\n    for _ in range(1000):\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
        "        children += 1\nexcept OSError:\n    pass\n"
    )
    result = run_in_sandbox(program, ["assert children < 16", "assert children > 0"], config)
    assert (result.passed, result.status) == (2, "ok")
    assert_host_untouched(result)  # the sleeping children died with the jail's pid 1


def test_unbounded_allocation_hits_the_memory_limit(config):
    program = "hoard = []\nwhile True:\n    hoard.append(bytearray(64 << 20))\n"
    result = run_in_sandbox(program, ["assert True"], config)
    assert (result.passed, result.status) == (0, "program_error")  # MemoryError, not the timeout
    assert "MemoryError" in result.output
    assert result.duration_s < WALL_TIMEOUT_S
    assert_host_untouched(result)


def test_busy_loop_is_killed_by_the_cpu_limit(config):
    assert config.cpu_time_s < WALL_TIMEOUT_S
    result = run_in_sandbox("def f():\n    while True:\n        pass\n", ["assert 1 == 1", "f()"], config)
    assert result.status == "cpu_limit"
    assert result.passed == 1  # the test that passed before the hang still counts
    assert result.pass_rate == 0.5
    assert result.duration_s < WALL_TIMEOUT_S + 1
    assert_host_untouched(result)


def test_idle_hang_is_killed_at_the_wall_clock(config):
    # Sleeping uses no CPU time: only the wall clock can end it.
    result = run_in_sandbox("import time\nwhile True:\n    time.sleep(0.1)\n", ["assert True"], config)
    assert (result.passed, result.status, result.exit_code) == (0, "timeout", None)
    assert WALL_TIMEOUT_S <= result.duration_s < WALL_TIMEOUT_S + 2
    assert_host_untouched(result)


def test_printing_gigabytes_stops_at_the_output_cap(config):
    program = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(10 ** 5):\n    sys.stdout.write(chunk)\n"
    result = run_in_sandbox(program, ["assert True"], config)
    assert (result.passed, result.status) == (0, "program_error")
    assert len(result.output) <= config.output_cap_bytes
    assert result.duration_s < WALL_TIMEOUT_S  # stopped by the cap, not by the clock
    assert_host_untouched(result)


def test_code_reward_runs_sandboxes_concurrently_and_scores_hostile_code_zero(config):
    # Four distinct programs: identical ones would run once (dedupe).
    sleepers = [f"```python\nimport time\ntime.sleep(1)\ndef f():\n    return 1  # {i}\n```" for i in range(4)]
    bomb = "```python\nimport os\nwhile True:\n    os.fork()\n```"
    tests = ["assert f() == 1"]
    code = get_reward("code", max_workers=4, wall_timeout_s=WALL_TIMEOUT_S, base_dir=config.base_dir)
    started = time.monotonic()
    scores = call_reward(code, ["p"] * 5, sleepers + [bomb], tests=[tests] * 5)
    elapsed = time.monotonic() - started
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert elapsed < 3.0  # four 1 s sleeps overlapped: one after another they would take over 4 s
    assert all(processes_of(r.uid) == [] for r in code.last_results)


@pytest.mark.parametrize("dedupe", [True, False])
def test_identical_programs_of_a_batch_run_once_unless_dedupe_is_off(config, dedupe):
    program = "```python\ndef f():\n    return 1\n```"
    other = "```python\ndef f():\n    return 2\n```"
    code = get_reward("code", base_dir=config.base_dir, dedupe=dedupe)
    tests = [["assert f() == 1"], ["assert f() == 1"], ["assert f() == 1"], ["assert f() == 2"]]
    scores = call_reward(code, ["p"] * 4, [program, program, other, program], tests=tests)
    assert scores == [1.0, 1.0, 0.0, 0.0]  # the last sample has other tests: its own run
    runs = code.last_results
    assert (runs[0] is runs[1]) == dedupe
    assert len({id(r) for r in runs}) == (3 if dedupe else 4)


def test_a_jail_that_cannot_be_built_is_an_error_not_a_score(config):
    broken = replace(config, python="/nonexistent/bin/python3")
    with pytest.raises(SandboxUnavailableError, match="could not run the code sandbox.*nonexistent"):
        run_in_sandbox("x = 1", ["assert x == 1"], broken)


def test_a_program_cannot_fake_a_launcher_failure(config):
    # Were this taken for a set-up failure, one sample could void the code reward of a whole batch.
    program = "import sys, os\nprint('sandbox launcher (jail): PermissionError', file=sys.stderr)\nos._exit(125)\n"
    result = run_in_sandbox(program, ["assert True"], config)
    assert (result.passed, result.status, result.exit_code) == (0, "crashed", 125)


def test_the_host_does_not_follow_links_the_program_leaves_behind(config):
    # Run as root, the host reads the output and results files back: it must not read a secret
    # through a symlink the program put in their place, nor hang on a FIFO.
    secret = Path(tempfile.mkdtemp(prefix="rewards-sandbox-secret-")) / "secret.txt"
    secret.write_text("pass 0\nTOP-SECRET\n")
    secret.chmod(0o600)
    program = (
        "import os\n"
        f"os.remove('output.log'); os.symlink({str(secret)!r}, 'output.log')\n"
        "os.mkfifo('results.txt.tmp'); os.rename('results.txt.tmp', 'results.txt')\n"
        "os._exit(0)\n"
    )
    try:
        result = run_in_sandbox(program, ["assert True"], config)
    finally:
        shutil.rmtree(secret.parent)
    assert "TOP-SECRET" not in result.output
    assert result.passed == 0
