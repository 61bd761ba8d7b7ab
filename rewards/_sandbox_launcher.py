"""Privileged half of the code sandbox: build the jail, drop to an unprivileged uid, exec the harness.

Run by `rewards.sandbox` as `python -I -S _sandbox_launcher.py JOB_JSON` with root privileges
(CAP_SYS_ADMIN). It must stay importable without the rest of the package (it runs with -I -S, so
only the standard library is available) and must stay single-threaded: it calls unshare(2).

The jail, and why each part is there:
- new network namespace: no interfaces but a loopback that is down, so every connect fails,
  including to services on the host's 127.0.0.1;
- new mount namespace with the whole tree remounted read-only (mount_setattr, recursive), except
  the private sandbox directory; the interpreter's prefix is bind-mounted read-only inside it,
  because the host interpreter may live under a directory the sandbox uid cannot traverse (/root);
- new pid namespace with a fresh /proc: its pid 1 is a small init (a fork of this launcher) that
  runs the program as its child and exits with it; when pid 1 exits (or is killed, by the host's
  clean-up or through PR_SET_PDEATHSIG when this launcher dies) the kernel kills every process in
  the namespace: a fork bomb cannot outlive the run;
- new IPC and UTS namespaces (no shared memory segments or message queues with the host);
- a per-run unprivileged uid/gid (not root, so RLIMIT_NPROC binds; unique per run, so two sandboxes
  do not share one process budget), no supplementary groups, PR_SET_NO_NEW_PRIVS (no setuid
  binaries);
- rlimits: CPU seconds, address space, file size (which also caps the output file), process count,
  open files, no core dumps.
`--kill-uid UID` is the clean-up after a wall-clock timeout: it kills every process the run's uid
owns (pid 1 of the jail included, which takes the rest of its namespace with it).
Exit status: the harness's status, 128+N when it died from signal N, or LAUNCH_FAILED when the jail
could not be built. Set-up failures are written to the descriptor `error_fd` of the job, which the
program cannot reach (closed at exec), so a program cannot fake one to void a batch.
"""

import ctypes
import json
import os
import resource
import signal
import sys

LAUNCH_FAILED = 125

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64 (new syscalls share one table)
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    encode = lambda s: None if s is None else s.encode()
    result = _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), None)
    _check(result, f"mount {source} on {target}")


def _set_readonly(path: str, readonly: bool, recursive: bool) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, f"mount_setattr {path} readonly={readonly}")


def build_jail(job: dict) -> None:
    """Namespaces and the read-only view; runs as root in the launcher before the fork."""
    _check(
        _libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
        "unshare (needs root / CAP_SYS_ADMIN)",
    )
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    sandbox_dir = job["dir"]
    _mount(sandbox_dir, sandbox_dir, None, MS_BIND)  # its own mount, so it alone can stay writable
    python_mount = os.path.join(sandbox_dir, job["python_mount"])
    os.mkdir(python_mount, 0o755)
    _mount(job["python_prefix"], python_mount, None, MS_BIND | MS_REC)
    _set_readonly("/", readonly=True, recursive=True)
    _set_readonly(sandbox_dir, readonly=False, recursive=False)


def become_sandbox_process(job: dict) -> None:
    """In pid 1 of the new namespace: fresh /proc, limits, unprivileged ids, die with the launcher.
    The program it forks inherits all of it."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    limits = job["limits"]
    for name, value in limits.items():
        # CPU: a hard limit equal to the soft one sends SIGKILL rather than SIGXCPU; one second
        # more lets SIGXCPU end the program first, so the host can tell a CPU-limit kill apart.
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(getattr(resource, name), (value, hard))
    os.setgroups([])
    os.setgid(job["uid"])
    os.setuid(job["uid"])
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    # Set after setuid: a credential change clears the parent-death signal.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


def kill_every_process_of(uid: int) -> None:
    """As `uid`, SIGKILL every process that uid owns (kill(-1) reaches exactly those)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    if sys.argv[1] == "--kill-uid":
        kill_every_process_of(int(sys.argv[2]))
        return
    job = json.loads(sys.argv[1])
    error_fd = job["error_fd"]
    os.set_inheritable(error_fd, False)  # closed at exec: the program cannot write there
    report = lambda where, error: os.write(error_fd, f"sandbox launcher ({where}): {error!r}\n".encode())
    try:
        build_jail(job)
    except OSError as error:
        report("jail", error)
        sys.exit(LAUNCH_FAILED)
    jail_init = os.fork()
    if jail_init == 0:
        try:
            become_sandbox_process(job)
            os.chdir(job["dir"])
        except BaseException as error:  # noqa: BLE001 - any failure here must not run the program
            report("jail init", error)
            os._exit(LAUNCH_FAILED)
        # The program must not be pid 1: the kernel drops signals that pid 1 does not handle
        # (RLIMIT_CPU's SIGXCPU among them), so pid 1 stays a small init that only waits.
        program = os.fork()
        if program == 0:
            try:
                os.execve(job["argv"][0], job["argv"], job["env"])
            except BaseException as error:  # noqa: BLE001
                report("exec", error)
            os._exit(LAUNCH_FAILED)
        os._exit(_exit_code(program))
    sys.exit(_exit_code(jail_init))


def _exit_code(pid: int) -> int:
    """Wait for `pid`; its exit status, or 128+N when signal N ended it."""
    _, status = os.waitpid(pid, 0)
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


if __name__ == "__main__":
    main()
