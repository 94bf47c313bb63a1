"""Run untrusted, model-written Python programs one per subprocess, with limits, and classify the outcome.

Each program runs in `python -I` (isolated mode: no PYTHON* variables, no user site, no current
directory on sys.path) in a new session (its own process group), with a fresh temporary directory
as working directory, HOME and TMPDIR, a minimal environment (no proxies, no credentials), stdin
from /dev/null and stdout/stderr to files. Before the program runs, a guard (`GUARD`, in the child):

- sets resource limits: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE),
  processes (RLIMIT_NPROC = 0: fork fails for a non-root user; root ignores it), no core files;
- replaces, in the child's Python, whatever starts processes (os.fork, os.system, os.exec*,
  os.spawn*, os.posix_spawn*, subprocess, os.kill), opens sockets (socket.socket, DNS lookups),
  writes, creates, removes or renames files outside the working directory (open/os.open in a
  write mode, os.remove/unlink/rmdir/rename/replace/mkdir/chmod/..., fd-relative calls), changes
  resource limits, or imports ctypes/cffi, by a stub that ends the program at once with the
  `forbidden` outcome (exit code 5; the program cannot catch it).

The parent waits with a wall-clock timeout, then kills the whole process group (SIGKILL), and
kills the group after every program in any case; every wait has a timeout, so no program can hang
the evaluation. This guards against accidents of generated code (a loop, a fork bomb, a stray
`rm`, a socket, a huge list), not against code written to escape: the guard is Python-level
(ctypes is refused, but a C extension already importable could still make system calls), and
there is no seccomp, no namespace, no chroot. Run untrusted models' code in a container or VM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Outcomes of a program, in the JSON results and the tables.
PASSED = "passed"
ERROR_KINDS = (
    "failed_assertion",  # an assert of the tests failed
    "syntax_error",  # the program does not compile
    "runtime_error",  # any other exception (or sys.exit)
    "timeout",  # wall-clock or CPU-time limit
    "memory",  # MemoryError under the address-space limit (or killed by it)
    "forbidden",  # the guard stopped a process, socket, file write/removal outside its directory, ...
    "file_size",  # wrote more than the file-size limit
    "crashed",  # killed by a signal (segfault, abort)
)
EXIT_CODES = {3: "syntax_error", 4: "failed_assertion", 5: "forbidden", 6: "memory", 7: "runtime_error", 8: "file_size"}
KILL_WAIT_SECONDS = 10.0  # after SIGKILL to the group, how long to wait for the child to be reaped
DETAIL_CHARS = 600  # the tail of stderr kept as an error's detail


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds per program
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE), stdout/stderr included

    @property
    def cpu_seconds(self) -> int:
        return max(1, int(self.timeout + 0.999))

    def check(self) -> list[str]:
        problems = []
        if not self.timeout > 0:
            problems.append(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.memory_mb < 64:
            problems.append(f"--memory-mb must be at least 64 (Python itself needs some), got {self.memory_mb}")
        if self.file_size_mb < 1:
            problems.append(f"file size limit must be at least 1 MB, got {self.file_size_mb}")
        return problems


@dataclass(frozen=True)
class Outcome:
    passed: bool
    kind: str  # "passed" or one of ERROR_KINDS
    detail: str  # the end of stderr (the traceback, the guard's message), or why it was stopped
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# Runs in the child: `python -I -c GUARD program.py memory_bytes cpu_seconds fsize_bytes`.
GUARD = r"""
import builtins, io, os, resource, sys
_exit, _write, _realpath, _getcwd, _join = os._exit, os.write, os.path.realpath, os.getcwd, os.path.join

def _forbid(what):
    try:
        _write(2, ("\nmftcoder-sandbox: forbidden: %s\n" % (what,)).encode("utf-8", "replace"))
    finally:
        _exit(5)

_path, _mem, _cpu, _fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(_path, encoding="utf-8") as _f:
    _source = _f.read()
for _limit, _soft, _hard in (
    (resource.RLIMIT_CPU, _cpu, _cpu + 1),
    (resource.RLIMIT_AS, _mem, _mem),
    (resource.RLIMIT_FSIZE, _fsize, _fsize),
    (resource.RLIMIT_NPROC, 0, 0),
    (resource.RLIMIT_CORE, 0, 0),
):
    resource.setrlimit(_limit, (_soft, _hard))
try:
    _code = compile(_source, "program.py", "exec")
except (SyntaxError, ValueError) as _err:
    import traceback
    traceback.print_exception(type(_err), _err, None)
    sys.stderr.flush()
    _exit(3)

_ROOT = _realpath(_getcwd())

def _inside(path):
    if isinstance(path, int):
        return True  # an open descriptor
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    full = _realpath(_join(_getcwd(), path))
    return full == _ROOT or full.startswith(_ROOT + os.sep) or full == "/dev/null"

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        _forbid("open(%r, %r) outside the sandbox directory" % (file, mode))
    return _open(file, mode, *args, **kwargs)
import _io, posix
builtins.open = io.open = _io.open = _guarded_open

_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, *args, dir_fd=None, **kwargs):
    if flags & _WRITE_FLAGS and (dir_fd is not None or not _inside(path)):
        _forbid("os.open(%r) for writing outside the sandbox directory" % (path,))
    return _os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)
os.open = posix.open = _guarded_os_open

def _paths_inside(name, original, npaths):
    def guarded(*args, **kwargs):
        if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            _forbid("os.%s with a dir_fd" % name)
        for path in list(args[:npaths]) + [kwargs[k] for k in ("path", "src", "dst") if k in kwargs]:
            if not _inside(path):
                _forbid("os.%s(%r) outside the sandbox directory" % (name, path))
        return original(*args, **kwargs)
    return guarded

for _name, _n in (
    ("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("mkdir", 1), ("makedirs", 1),
    ("chmod", 1), ("lchmod", 1), ("chown", 1), ("lchown", 1), ("truncate", 1), ("utime", 1),
    ("mkfifo", 1), ("mknod", 1), ("chroot", 0),
    ("rename", 2), ("renames", 2), ("replace", 2), ("link", 2), ("symlink", 2),
):
    if hasattr(os, _name):
        _guarded = _paths_inside(_name, getattr(os, _name), _n)
        setattr(os, _name, _guarded)
        if hasattr(posix, _name):  # os re-exports posix: patch the source too
            setattr(posix, _name, _guarded)

def _refuse(name):
    def refused(*args, **kwargs):
        _forbid(name)
    return refused

for _name in (
    "fork", "forkpty", "vfork", "system", "popen", "kill", "killpg", "setsid", "setuid", "setgid",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp", "_exit",
):
    if hasattr(os, _name):
        setattr(os, _name, _refuse("os." + _name))
    if hasattr(posix, _name):
        setattr(posix, _name, _refuse("posix." + _name))
for _name in ("setrlimit", "prlimit"):
    if hasattr(resource, _name):
        setattr(resource, _name, _refuse("resource." + _name))

import _posixsubprocess, subprocess
_posixsubprocess.fork_exec = _refuse("subprocess")
subprocess.Popen.__init__ = _refuse("subprocess.Popen")
for _name in ("call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _refuse("subprocess." + _name))

import _socket, socket
class _NoSocket:
    def __init__(self, *args, **kwargs):
        _forbid("socket")
socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
              "gethostbyname_ex", "gethostbyaddr"):
    if hasattr(socket, _name):
        setattr(socket, _name, _refuse("socket." + _name))

class _RefuseImports:
    BLOCKED = {"ctypes", "_ctypes", "cffi", "_cffi_backend"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            _forbid("import " + name)
        return None
for _name in list(sys.modules):
    if _name.split(".")[0] in _RefuseImports.BLOCKED:
        del sys.modules[_name]
sys.meta_path.insert(0, _RefuseImports())

import errno as _errno, traceback as _traceback
_globals = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(_code, _globals)
except AssertionError:
    _traceback.print_exc()
    _status = 4
except MemoryError:
    _globals = None
    _write(2, b"MemoryError\n")
    _status = 6
except SystemExit as _err:
    _write(2, ("SystemExit(%r): the program exited before its tests finished\n" % (_err.code,)).encode())
    _status = 7
except OSError as _err:
    _traceback.print_exc()
    _status = 8 if _err.errno == _errno.EFBIG else 7
except BaseException:
    try:
        _traceback.print_exc()
    except BaseException:
        pass
    _status = 7
else:
    _status = 0
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
_exit(_status)
"""


def minimal_env(home: Path) -> dict[str, str]:
    """The child's whole environment: no proxies, tokens, or PYTHON* variables."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - DETAIL_CHARS * 4))
            return handle.read().decode("utf-8", "replace")[-DETAIL_CHARS:].strip()
    except OSError:
        return ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run one program (its source) in a fresh sandbox and classify how it ended."""
    root = Path(tempfile.mkdtemp(prefix="mftcoder-sandbox-"))
    work = root / "work"
    work.mkdir()
    start = time.monotonic()
    try:
        (root / "program.py").write_text(program, encoding="utf-8")
        argv = [
            sys.executable,
            "-I",
            "-c",
            GUARD,
            str(root / "program.py"),
            str(limits.memory_mb * 2**20),
            str(limits.cpu_seconds),
            str(limits.file_size_mb * 2**20),
        ]
        with (root / "stdout").open("wb") as out, (root / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=minimal_env(work),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
        timed_out = False
        try:
            code = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            try:
                code = proc.wait(timeout=KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:  # not even SIGKILL ended it (uninterruptible I/O)
                code = None
        _kill_group(proc.pid)  # anything the program left behind in its group
        seconds = round(time.monotonic() - start, 3)
        detail = _tail(root / "stderr")
        if timed_out or code is None:
            return Outcome(False, "timeout", f"no result within {limits.timeout:g} s (wall clock); killed", seconds)
        if code == 0:
            return Outcome(True, PASSED, "", seconds)
        if code < 0:
            sig = -code
            if sig in (signal.SIGXCPU, signal.SIGKILL):
                return Outcome(False, "timeout", f"CPU time limit ({limits.cpu_seconds} s) reached", seconds)
            if sig == signal.SIGXFSZ:
                return Outcome(False, "file_size", f"file size limit ({limits.file_size_mb} MB) reached", seconds)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return Outcome(False, "crashed", f"killed by {name}. {detail}".strip(), seconds)
        kind = EXIT_CODES.get(code, "runtime_error")
        if kind == "memory":
            detail = f"MemoryError under the {limits.memory_mb} MB address-space limit"
        return Outcome(False, kind, detail, seconds)
    finally:
        _remove(root)


def _remove(root: Path) -> None:
    def writable(func, path, _exc):  # a program may chmod its own files read-only
        try:
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(root, onexc=writable)
    else:
        shutil.rmtree(root, onerror=writable)


def run_programs(
    programs: Sequence[str],
    limits: Limits = Limits(),
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Outcomes of many programs, in order, `workers` at a time (threads, each waiting on its child)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    results: list[Outcome | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, program, limits): i for i, program in enumerate(programs)}
        for future in futures:
            results[futures[future]] = future.result()
            if progress is not None:
                progress(1)
    return results  # type: ignore[return-value]
