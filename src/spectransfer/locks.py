"""One writer per output: a lock file that says who holds it, and that a dead holder's lock is stale.

Ingest (a store), train (a run folder) and discover (a catalogue) each take the lock of what
they write, so two commands never interleave their files. The lock file records host, pid,
the process start time and the boot id: a pid alone is not enough, because after a reboot
(or on a busy machine) the pid of a dead holder may belong to an unrelated live process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spectransfer.errors import OutputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock; ``start`` is the process start time in clock ticks since boot (Linux)."""

    host: str
    pid: int
    start: str = ""
    boot_id: str = ""
    what: str = ""

    @classmethod
    def me(cls, what: str) -> LockOwner:
        return cls(socket.gethostname(), os.getpid(), _start_time(os.getpid()), _boot_id(), what)

    @classmethod
    def parse(cls, text: str) -> LockOwner:
        """Read a lock file: JSON, or the older 'HOST PID' line of ingest."""
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d.get("start", "")), str(d.get("boot_id", "")), str(d.get("what", "")))
        except (ValueError, KeyError, TypeError):
            parts = text.split()
            if len(parts) == 2 and parts[1].isdigit():
                return cls(parts[0], int(parts[1]))
            return cls("", 0)

    def alive(self) -> bool | None:
        """True/False when this machine can tell; None for another host (cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        if self.boot_id and self.boot_id != _boot_id():
            return False  # written before the last reboot
        if not _pid_alive(self.pid):
            return False
        if self.start and self.start != _start_time(self.pid):
            return False  # the pid now belongs to another process
        return True


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _start_time(pid: int) -> str:
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""  # field 22 of proc(5), counted after "(comm) "


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``with OutputLock(path, "train"):`` -- exclusive use of ``path`` (a lock file) by this process.

    A lock left by a dead process (or one from before a reboot, or whose pid was reused) is
    taken over with a warning; a live holder, or one on another host, raises OutputError
    with a hint.
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.held = False
        self.made_folder = False

    def __enter__(self) -> OutputLock:
        me = LockOwner.me(self.what)
        try:
            self.made_folder = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path.parent}: cannot write here ({exc.strerror or exc})") from exc
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale(LockOwner.parse(_read(str(self.path))))
                continue
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot take the lock ({exc.strerror or exc})") from exc
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(asdict(me)) + "\n")
            self.held = True
            return self
        raise OutputError(f"{self.path}: cannot take the lock (another process keeps taking it)")

    def _check_stale(self, owner: LockOwner) -> None:
        """Raise when ``owner`` may still be running; otherwise remove its lock."""
        who = f"{owner.what or 'a process'} (pid {owner.pid} on {owner.host or 'an unknown host'})"
        state = owner.alive()
        if state is None:
            raise OutputError(
                f"{self.path.parent}: in use by {who}; this machine cannot check it: remove {self.path} if that process is gone"
            )
        if state:
            raise OutputError(f"{self.path.parent}: in use by {who}; wait for it to finish or stop it")
        log.warning("%s: taking over the lock of %s, which is no longer running", self.path, who)
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.made_folder:  # a run refused before it wrote anything leaves no empty folder
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass
