"""A memory cgroup for a test's processes, so that the OS enforces a memory limit on them: a
process over it is OOM-killed (SIGKILL), which is how an under-estimated budget would show.

`MemoryCgroup.create(limit)` makes a cgroup v2 (`memory.max`) or v1 (`memory.limit_in_bytes`)
with the memory controller, under this process's own cgroup where it may, else under the
hierarchy's root; `prefix()` is the command line that starts a process inside it; `remove()`
takes it away again (after its processes ended). Creating one needs root and a writable cgroup
file system with the memory controller: `create` raises `Unavailable` with the reason otherwise,
which the tests turn into a skip. Swap is limited to nothing where the cgroup can say so, so the
limit means resident memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


class Unavailable(Exception):
    """No memory cgroup can be made here; the message says why."""


def _mounts() -> dict[str, Path]:
    """'v2' -> the unified hierarchy's mount, 'v1' -> the v1 memory controller's (where mounted)."""
    out: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        point, fstype, options = Path(fields[4]), tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            out.setdefault("v2", point)
        elif fstype == "cgroup" and "memory" in options:
            out.setdefault("v1", point)
    return out


def _own_path(version: str) -> Path:
    """This process's cgroup in that hierarchy (from /proc/self/cgroup), relative to its mount."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == "v2" and controllers == "") or (
            version == "v1" and "memory" in controllers.split(",")
        ):
            return Path(path.lstrip("/"))
    return Path()


@dataclass
class MemoryCgroup:
    path: Path
    version: str  # "v1" or "v2"
    limit: int

    @classmethod
    def create(cls, limit: int, name: str = "pipeserve-test") -> MemoryCgroup:
        if os.geteuid() != 0:
            raise Unavailable("creating a memory cgroup needs root")
        mounts = _mounts()
        reasons = []
        for version in ("v2", "v1"):
            mount = mounts.get(version)
            if mount is None:
                reasons.append(f"no cgroup {version} memory hierarchy is mounted")
                continue
            if version == "v2" and "memory" not in _read(mount / "cgroup.controllers").split():
                reasons.append(f"cgroup v2 at {mount} has no memory controller (it is bound to v1)")
                continue
            own = mount / _own_path(version)
            for parent in dict.fromkeys([own, mount]):
                try:
                    return cls._make(parent, version, limit, name)
                except OSError as exc:
                    reasons.append(f"cgroup {version} under {parent}: {exc.strerror or exc}")
        raise Unavailable("; ".join(reasons))

    @classmethod
    def _make(cls, parent: Path, version: str, limit: int, name: str) -> MemoryCgroup:
        if version == "v2":
            control = parent / "cgroup.subtree_control"
            if "memory" not in _read(control).split():
                control.write_text("+memory")  # EBUSY where the parent holds processes (not the root)
        path = parent / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        cg = cls(path, version, limit)
        try:
            if version == "v2":
                (path / "memory.max").write_text(str(limit))
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                with contextlib.suppress(OSError):  # only where swap accounting is on
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            cg.remove()
            raise
        return cg

    def prefix(self) -> list[str]:
        """A command line prefix: what follows it runs inside this cgroup (the shell moves itself
        in, then execs the command, which keeps its PID)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def oom_kills(self) -> int:
        """Processes the OOM killer ended in this cgroup so far."""
        text = _read(self.path / ("memory.events" if self.version == "v2" else "memory.oom_control"))
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        # an old v1 kernel without the counter: count the times usage hit the limit instead
        return int(_read(self.path / "memory.failcnt") or 0) if self.version == "v1" else 0

    def peak(self) -> int | None:
        """Highest memory use of the cgroup, bytes (page cache included), where the kernel says."""
        text = _read(self.path / ("memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes"))
        return int(text) if text.strip().isdigit() else None

    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the cgroup; its processes must have ended (waits for the kernel to see them go)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
