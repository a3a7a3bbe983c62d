"""Two walls around a sandboxed child that Landlock and a process group do not give (fleet_server/sandbox.py):

- a **cgroup** of its own: everything the child starts, in any session, is killed with it. A process group is not
  enough: a grandchild that calls ``setsid()`` leaves it and outlived the sandbox (red team), able to read the next
  uploads' work folders;
- a **network namespace** of its own (``unshare --net``): no interface but a loopback that is down, so no UDP either
  (Landlock confines TCP only: the child could send datagrams anywhere).

Each is used where the host allows it (cgroup v2 writable, ``unshare`` permitted) and said in the log where not.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
KILL_WAIT_S = 5.0


def _cgroup2_root() -> Path | None:
    """Where this process's cgroup v2 lives, if the unified hierarchy is mounted and writable."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    mount = next((Path(line.split()[1]) for line in mounts if line.split()[2:3] == ["cgroup2"]), None)
    if mount is None:
        return None
    root = mount / own.strip().lstrip("/")
    return root if os.access(root, os.W_OK) else None


class ChildCgroup:
    """A cgroup for one child, created before it runs untrusted code and killed whole after it."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls) -> ChildCgroup | None:
        root = _cgroup2_root()
        if root is None:
            _warn_once("sandbox: no writable cgroup v2; a process that leaves the child's session outlives it")
            return None
        path = root / f"edgefleet-sandbox-{uuid.uuid4().hex}"
        try:
            path.mkdir()
        except OSError as e:
            _warn_once(f"sandbox: cannot create a cgroup ({e}); a process that leaves the child's session outlives it")
            return None
        return cls(path)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (``cgroup.kill`` where the kernel has it, else one by one, until
        none is left) and remove it."""
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline:
            pids = self._pids()
            if not pids:
                break
            kill_file = self.path / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        with contextlib.suppress(OSError):  # busy while a process is still exiting: retried until the deadline
            while True:
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

    def _pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []


def network_wrapper(account: tuple[int, int] | None) -> list[str]:
    """The command prefix that starts the child in a network namespace of its own, or [] where the host does not
    allow it. ``account``: the unprivileged (uid, gid) the child is started as, who needs a user namespace to have a
    network namespace; None when it starts as this process's user."""
    return list(_network_wrapper(account))


@functools.cache
def _network_wrapper(account: tuple[int, int] | None) -> tuple[str, ...]:
    unshare = shutil.which("unshare")
    if unshare is None:
        _warn_once("sandbox: no unshare(1); the child keeps the host's network (UDP is not confined)")
        return ()
    own = account is None and os.geteuid() == 0
    prefix = (unshare, "--net", "--") if own else (unshare, "--user", "--net", "--")
    if not runs([*prefix, "true"], account):
        _warn_once("sandbox: cannot give the child a network namespace here; UDP is not confined")
        return ()
    return prefix


@functools.cache
def _runs(command: tuple[str, ...], account: tuple[int, int] | None) -> bool:
    who = {"user": account[0], "group": account[1], "extra_groups": []} if account else {}
    try:
        return subprocess.run(list(command), capture_output=True, timeout=30, **who).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def runs(command: list[str], account: tuple[int, int] | None = None) -> bool:
    """Whether ``command`` runs and succeeds as ``account`` (cached: asked once per process)."""
    return _runs(tuple(command), account)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)
