"""Untrusted work (validating and converting uploaded models) in a child process that cannot reach the server's
secrets, under memory and time limits.

Why: loading a model runs a great deal of foreign parsing code (protobuf, torch's deserializer, ONNX Runtime,
TensorFlow) on bytes an operator uploaded. A bug in any of it, or a pickle smuggled into a ``.pt2``, must not hand
over the fleet's online signing key (``<data_dir>/keys/online.pem``), the fleet CA key (``<pki_dir>/ca.key``) or the
database, and a decompression bomb must not take the server's memory.

The child is ``python -m fleet_server.sandbox``. It starts with a cleared environment (no ``EF_SERVER_*``, no
passwords), in its own session (one process group, killed as a whole), in a fresh work folder holding copies of its
inputs. It reads its request as JSON on stdin and answers with JSON lines on a pipe (progress, then the result).
Before it touches any input it limits itself:

- memory: ``RLIMIT_DATA`` (private writable memory; ``RLIMIT_AS`` would also count the address space TensorFlow,
  ONNX Runtime and glibc reserve but never use), no core files; the parent kills the process group at a deadline;
- Landlock (Linux >= 5.13): nothing under the protected paths (data directory, PKI folder, broker files, the SQLite
  file, ``.env``) or ``/dev`` can be read, nothing outside the work folder written, no TCP connection made, no signal
  or ptrace reach a process outside the sandbox (so not ``/proc/<server>/environ`` either);
- as root: the server starts the child as ``sandbox_user`` (default ``nobody``), which cannot read the 0600 key
  files. Where that user cannot run the interpreter (say, Python lives under ``/root``), the child stays uid 0 with
  every capability dropped, and then refuses to run at all without Landlock; root-owned files outside the
  protected paths (``/root``, ``/etc/shadow``) stay readable to it, so install Python where the sandbox user can
  run it (the log says "cannot run" when it cannot).

Operators: when the server does not run as root, the child keeps the server's uid; without Landlock it could then
read everything the server can, the key files included. Run the server under a dedicated user that owns only its
data directory, on a kernel with Landlock (check the log for "sandbox: no Landlock"), or start it as root with
``EF_SERVER_SANDBOX_USER`` naming a dedicated user that owns nothing (and can read the Python installation).

The parent side is :class:`Sandbox`: copy inputs in, :meth:`Sandbox.run` a target (``"module:function"``, called as
``function(args, progress)`` in the child, returning JSON-able data), read outputs back with
:meth:`Sandbox.open_output`, which never follows a link the child may have planted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import platform
import pwd
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fleet_server.isolation import ChildCgroup, network_wrapper, runs

if TYPE_CHECKING:
    from fleet_server.settings import ServerSettings

log = logging.getLogger(__name__)
MAX_MESSAGES_BYTES = 64 << 20  # all the child may say on its pipe
LOG_TAIL_BYTES = 4096
# How C++ libraries word a failed allocation (protobuf: "Arena alloc failed"; numpy: "Unable to allocate").
MEMORY_HINTS = ("MemoryError", "bad_alloc", "alloc failed", "Cannot allocate memory", "out of memory",
                "Unable to allocate")


class SandboxError(Exception):
    """The sandbox could not run the work (it cannot confine the child, or the child broke the protocol)."""


class SandboxLimitError(SandboxError):
    """The child went past its memory or time limit."""


class SandboxCrashError(SandboxError):
    """The child died, or its target raised something unexpected."""


class SandboxCancelledError(SandboxError):
    """The work was cancelled; the child and everything it started were killed."""


@dataclass(frozen=True)
class SandboxConfig:
    memory_mb: int = 8192
    timeout_s: float = 600.0
    user: str | None = "nobody"  # whom the child runs as when the server is root
    protect: tuple[Path, ...] = ()  # never readable by the child
    python: str = sys.executable
    python_path: tuple[str, ...] = ()  # extra import roots for the child (PYTHONPATH)

    @classmethod
    def for_server(cls, data_dir: Path, database_url: str, **kwargs: Any) -> SandboxConfig:
        """Protect the data directory (keys, PKI, artifacts) and the SQLite file, whatever else is configured."""
        return cls(protect=_server_paths(data_dir, database_url), **kwargs)

    @classmethod
    def from_settings(cls, settings: ServerSettings, *, timeout_s: float | None = None) -> SandboxConfig:
        extra = (settings.pki_folder, settings.broker_files_dir, settings.broker_key_file, Path(".env"))
        protect = _server_paths(settings.data_dir, settings.database_url) + tuple(p for p in extra if p)
        return cls(memory_mb=settings.sandbox_memory_mb, timeout_s=timeout_s or settings.sandbox_timeout_s,
                   user=settings.sandbox_user or None, protect=protect)


def _server_paths(data_dir: Path, database_url: str) -> tuple[Path, ...]:
    paths = [Path(data_dir), Path(data_dir) / "pki"]
    if database_url.startswith("sqlite:///"):
        db = Path(database_url.removeprefix("sqlite:///").split("?")[0])
        paths += [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    return tuple(paths)


@dataclass
class _Outcome:
    result: Any = None
    answered: bool = False
    error: dict | None = None
    confined: dict = field(default_factory=dict)


class Sandbox:
    """One work folder and the children run in it: ``with Sandbox(config, "validation") as box: ...``."""

    def __init__(self, config: SandboxConfig, what: str):
        self.config, self.what = config, what
        self.work = Path()

    def __enter__(self) -> Sandbox:
        self.work = Path(tempfile.mkdtemp(prefix="fleet-sandbox-")).resolve()
        if any(self.work.is_relative_to(p) for p in _resolved(self.config.protect)):
            shutil.rmtree(self.work, ignore_errors=True)
            raise SandboxError(f"the temporary folder {self.work.parent} lies inside a protected path; "
                               "point TMPDIR elsewhere")
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def add_input(self, source: Path, name: str) -> str:
        """Copy ``source`` in as ``in/<name>``; the child's path for it (relative to its working directory)."""
        target = self.work / "in" / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        return f"in/{name}"

    def add_stream(self, source: IO[bytes], name: str) -> str:
        """Like ``add_input``, from a readable stream (an artifact in object storage); closes it."""
        target = self.work / "in" / name
        target.parent.mkdir(exist_ok=True)
        with source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        return f"in/{name}"

    def run(self, target: str, args: dict, *, on_progress: Callable[[str], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> Any:
        """Run ``target`` in a fresh child; its return value. Raises SandboxLimitError, SandboxCrashError, and
        SandboxCancelledError once ``cancelled()`` (asked about once a second) says so."""
        account = self._account()
        read_end, write_end = os.pipe()
        request = {"target": target, "args": args, "pipe_fd": write_end, "memory_mb": self.config.memory_mb,
                   "work": str(self.work), "protect": [str(p) for p in _resolved(self.config.protect)]}
        try:
            with tempfile.TemporaryFile() as output:
                try:
                    proc, account = self._spawn(account, write_end, output)
                finally:
                    os.close(write_end)
                # Into a cgroup of its own before it reads its request (nothing untrusted has run yet): whatever it
                # starts, in any session, is killed with it.
                cgroup = ChildCgroup.create()
                if cgroup is not None:
                    cgroup.add(proc.pid)
                try:
                    status, peak_kb, outcome = self._supervise(proc, account, request, read_end, on_progress,
                                                               cancelled)
                finally:
                    _kill_group(proc.pid)  # whatever the child left behind, or all of it on a limit
                    if cgroup is not None:
                        cgroup.kill()
                    proc.wait()
                return self._verdict(outcome, status, peak_kb, _tail(output))
        finally:
            os.close(read_end)

    def _supervise(self, proc: subprocess.Popen, account: tuple[int, int] | None, request: dict, read_end: int,
                   on_progress: Callable[[str], None] | None,
                   cancelled: Callable[[], bool] | None = None) -> tuple[int, int, _Outcome]:
        started = time.monotonic()
        if account is not None:  # the inputs become readable to the child only, never to anyone else
            _chown_tree(self.work, *account)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError), proc.stdin:  # a child dead at start says so below
            proc.stdin.write(json.dumps(request).encode())
        outcome = self._collect(read_end, started, on_progress, cancelled)
        status, peak_kb = _reap(proc, started + self.config.timeout_s)
        return status, peak_kb, outcome

    def open_output(self, relative: str) -> IO[bytes]:
        """Open a file the child wrote, refusing links and anything outside the work folder (the child may have
        replaced its outputs with links to the server's keys before it exited)."""
        parts = Path(relative).parts
        if not parts or Path(relative).is_absolute() or any(p in ("..", ".") for p in parts):
            raise SandboxError(f"{self.what} named an output outside its work folder")
        fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as e:
            raise SandboxError(f"{self.what} left an unreadable output ({e.strerror})") from e
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise SandboxError(f"{self.what} left an output that is not a regular file")
        return os.fdopen(file_fd, "rb")

    # --------------------------------------------------------------------------------------------- internals

    def _account(self) -> tuple[int, int] | None:
        if os.geteuid() != 0 or not self.config.user:
            return None
        try:
            entry = pwd.getpwnam(self.config.user)
        except KeyError as e:
            raise SandboxError(f"sandbox user {self.config.user!r} does not exist") from e
        if entry.pw_uid == 0:
            raise SandboxError("the sandbox user must not be root")
        return entry.pw_uid, entry.pw_gid

    def _spawn(self, account: tuple[int, int] | None, pipe_fd: int,
               output: IO[bytes]) -> tuple[subprocess.Popen, tuple[int, int] | None]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.work),
               "TMPDIR": str(self.work), "XDG_CACHE_HOME": str(self.work / ".cache"), "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"}
        if self.config.python_path:
            env["PYTHONPATH"] = os.pathsep.join(self.config.python_path)
        # -P: the work folder (the child's cwd) never lands on sys.path.
        command = [self.config.python, "-P", "-m", "fleet_server.sandbox"]
        options: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": output, "stderr": subprocess.STDOUT,
                                   "cwd": self.work, "env": env, "pass_fds": (pipe_fd,), "start_new_session": True}
        if account is not None and runs([self.config.python, "-c", "pass"], account):
            with contextlib.suppress(PermissionError):  # the probe ran, yet this exec was refused: fall back below
                return subprocess.Popen(network_wrapper(account) + command, user=account[0], group=account[1],
                                        extra_groups=[], **options), account
        if account is not None:
            log.warning("sandbox: user %s cannot run %s; the %s child runs as uid 0 without capabilities, "
                        "confined by Landlock", self.config.user, self.config.python, self.what)
        # unshare(1) execs the child in place: same pid, same descriptors, its own network namespace
        return subprocess.Popen(network_wrapper(None) + command, **options), None

    def _collect(self, read_end: int, started: float, on_progress: Callable[[str], None] | None,
                 cancelled: Callable[[], bool] | None = None) -> _Outcome:
        outcome, pending, total = _Outcome(), b"", 0
        deadline, asked = started + self.config.timeout_s, time.monotonic()
        while (remaining := deadline - time.monotonic()) > 0:
            if cancelled is not None and time.monotonic() - asked >= 1.0:
                asked = time.monotonic()
                if cancelled():  # the caller's finally kills the child's group and cgroup
                    raise SandboxCancelledError(f"{self.what} was cancelled")
            ready, _, _ = select.select([read_end], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                return outcome
            total += len(chunk)
            if total > MAX_MESSAGES_BYTES:
                raise SandboxCrashError(f"{self.what} sent more than {MAX_MESSAGES_BYTES >> 20} MiB of messages")
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                self._take(line, outcome, on_progress)
        raise SandboxLimitError(f"{self.what} did not finish within its {self.config.timeout_s:.0f} s limit")

    def _take(self, line: bytes, outcome: _Outcome, on_progress: Callable[[str], None] | None) -> None:
        try:
            message = json.loads(line)
        except ValueError as e:
            raise SandboxCrashError(f"{self.what} broke the sandbox protocol") from e
        if not isinstance(message, dict):
            raise SandboxCrashError(f"{self.what} broke the sandbox protocol")
        if "progress" in message and on_progress is not None:
            on_progress(str(message["progress"])[:500])
        elif "confined" in message and isinstance(message["confined"], dict):
            outcome.confined = message["confined"]
            if not outcome.confined.get("landlock"):
                log.warning("sandbox: no Landlock on this kernel; the %s child (uid %s) can read what that user "
                            "can", self.what, outcome.confined.get("uid"))
        elif "result" in message:
            outcome.result, outcome.answered = message["result"], True
        elif "error" in message and isinstance(message["error"], dict):
            outcome.error = message["error"]

    def _verdict(self, outcome: _Outcome, status: int, peak_kb: int, tail: str) -> Any:
        memory = f"{self.what} exceeded its {self.config.memory_mb} MiB memory limit"
        if outcome.error is not None:
            kind = outcome.error.get("kind")
            if kind == "memory":
                raise SandboxLimitError(memory)
            if kind == "confine":
                raise SandboxError(f"{self.what} could not be confined: {outcome.error.get('message')}")
            log.warning("sandbox: %s raised %s: %s", self.what, outcome.error.get("type"),
                        outcome.error.get("traceback", ""))
            raise SandboxCrashError(f"{self.what} failed ({outcome.error.get('type', 'error')})")
        if outcome.answered and status == 0:
            return outcome.result
        if any(h in tail for h in MEMORY_HINTS) or peak_kb >= self.config.memory_mb * 1024 * 0.9:
            raise SandboxLimitError(memory)
        log.warning("sandbox: %s ended with status %s: %s", self.what, status, tail[-1000:])
        if status < 0:
            raise SandboxCrashError(f"{self.what} crashed ({signal.Signals(-status).name})")
        raise SandboxCrashError(f"{self.what} exited with status {status} without a result")


def _resolved(paths: tuple[Path, ...]) -> list[Path]:
    return [Path(p).resolve() for p in paths]


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid, follow_symlinks=False)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


def _reap(proc: subprocess.Popen, deadline: float) -> tuple[int, int]:
    """Wait for the child (it closed its pipe, so it is exiting); its exit status and peak RSS in KiB."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
        time.sleep(0.02)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the child leads its own group (start_new_session)


def _tail(output: IO[bytes]) -> str:
    output.seek(0, os.SEEK_END)
    output.seek(max(0, output.tell() - LOG_TAIL_BYTES))
    return output.read().decode(errors="replace")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` was caused by running out of memory: libraries wrap MemoryError in their own errors, or
    turn a failed allocation into a RuntimeError with a message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, MemoryError) or any(hint in str(current) for hint in MEMORY_HINTS):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


# ================================================================================================== child side
# Landlock (include/uapi/linux/landlock.h). The syscall numbers are the same on every architecture Linux added
# them to after 5.12 (x86_64, aarch64, riscv64...).
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 24, 28, 38, 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE and KEEP_CAPS off, all locked: uid 0 never regains a capability.
_SECUREBITS_LOCKED_DOWN = 0xEF
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(value: int, what: str) -> int:
    if value < 0:
        raise SandboxError(f"{what}: {os.strerror(ctypes.get_errno())}")
    return value


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (or a seccomp filter hides it)."""
    if platform.system() != "Linux":
        return 0
    libc = _libc()
    abi = libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(abi), 0)


def read_grants(protect: list[Path]) -> list[tuple[str, bool]]:
    """Every path to grant read access on so that everything is readable except ``protect`` (and ``/dev``), as
    (path, is_directory). Landlock only allows, so we allow each sibling along the way down to a protected path."""
    blocked = set(protect) | {Path("/dev")}
    # Only the outermost: walking into a protected folder (data_dir holds pki/) would grant its other entries.
    blocked = {p for p in blocked if not any(q in blocked for q in p.parents)}
    ancestors = {parent for p in blocked for parent in p.parents}
    grants = []
    for folder in sorted(ancestors):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if path in blocked or path in ancestors or entry.is_symlink():
                continue  # a link's target is granted (or not) where it really lives
            grants.append((entry.path, entry.is_dir(follow_symlinks=False)))
    return grants


def _landlock(abi: int, protect: list[Path], work: Path) -> None:
    libc = _libc()
    all_fs = (1 << 13) - 1
    all_fs |= (1 << 13) if abi >= 2 else 0  # REFER
    all_fs |= _FS_TRUNCATE if abi >= 3 else 0
    all_fs |= _FS_IOCTL_DEV if abi >= 5 else 0
    attr = _RulesetAttr(all_fs, (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
                        (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(libc.syscall(ctypes.c_long(_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                                  ctypes.c_uint32(0)), "landlock_create_ruleset")
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    rules = [("/", _FS_READ_DIR, True), (str(work), all_fs, True)]
    rules += [(path, read if is_dir else read & _FS_FILE_RIGHTS, is_dir) for path, is_dir in read_grants(protect)]
    rules += [(d, (_FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV) & all_fs, False) for d in _DEVICES]
    try:
        for path, access, is_dir in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0))
            except OSError:
                continue  # vanished since the listing, or not for us
            try:
                rule = _PathBeneathAttr(access, fd)
                _check(libc.syscall(ctypes.c_long(_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                    ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                    ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(libc.syscall(ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _drop_capabilities() -> None:
    """For a child that had to stay uid 0: no capability now or after any exec."""
    libc = _libc()
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "drop a bounding capability")
    _check(libc.prctl(_PR_SET_SECUREBITS, _SECUREBITS_LOCKED_DOWN, 0, 0, 0), "securebits")
    _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3: zeroed sets
    _check(libc.capset(ctypes.byref(header), data), "capset")
    status = Path("/proc/self/status").read_text()
    if "CapEff:\t0000000000000000" not in status or "CapPrm:\t0000000000000000" not in status:
        raise SandboxError("capabilities are still held after dropping them")


def _confine(request: dict) -> dict:
    """Limits and confinement, before the target (and so any input) is touched."""
    memory = request["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0o077)
    abi = landlock_abi()
    if abi:
        _landlock(abi, [Path(p) for p in request["protect"]], Path(request["work"]))
    if os.getuid() == 0 or os.geteuid() == 0:
        if not abi:
            raise SandboxError("the child would run as root and this kernel has no Landlock; set "
                               "EF_SERVER_SANDBOX_USER to a user that can run the interpreter")
        _drop_capabilities()
    return {"landlock": abi, "uid": os.getuid()}


def _target(name: str) -> Callable[[dict, Callable[[str], None]], Any]:
    import importlib

    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def child_main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    channel = os.fdopen(request["pipe_fd"], "w", buffering=1)

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        send({"confined": _confine(request)})
    except (SandboxError, OSError) as e:
        send({"error": {"kind": "confine", "message": str(e)}})
        return 3
    try:
        result = _target(request["target"])(request["args"], lambda text: send({"progress": str(text)}))
    except BaseException as e:  # the parent decides what it means; it gets no more than the type and a traceback
        kind = "memory" if out_of_memory(e) else "exception"
        send({"error": {"kind": kind, "type": type(e).__name__, "traceback": traceback.format_exc()[-4000:]}})
        return 1
    send({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
