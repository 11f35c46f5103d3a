"""One training at a time per bundle: a lock file that names its owner.

:func:`hold` creates ``path`` (``models/training.lock`` in the train configs) with ``O_CREAT | O_EXCL``, holding
the owner's PID, host, start time and command as JSON, and removes it when the process exits (normally, on an
exception, on SIGTERM / Ctrl-C). A second training into the same bundle refuses at once with
:class:`BundleLocked`, naming the first. A lock whose owner no longer runs (killed with SIGKILL, the machine
restarted) is stale: it is taken over with a warning. The owner is alive when, on this host, its PID exists and
the process has the start time the lock recorded (a PID reused by another process does not count); a lock written
on another host (a shared file system) is never taken over, since its owner cannot be checked from here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import time

logger = logging.getLogger(__name__)


class BundleLocked(RuntimeError):
    """Another training holds the bundle's lock."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), None where
    ``/proc`` is missing or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)": state is field 3, starttime field 22


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    recorded, now = owner.get("process_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # empty or torn: an owner killed while writing it
        return {}


def _describe(owner: dict) -> str:
    return (f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}: "
            f"{owner.get('command', '?')}")


class Lock:
    """The lock this process holds on ``path``; :meth:`release` (also run at exit) removes the file if it is still
    this process's."""

    def __init__(self, path: str, owner: dict) -> None:
        self.path, self.owner = path, owner

    def release(self) -> None:
        if _read(self.path) == self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def _create(path: str, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(owner, f)
    return True


def hold(path: str) -> Lock:
    """Take the lock file ``path`` for this process until it exits, or raise :class:`BundleLocked` naming the
    process that holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    owner = {
        "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "process_start": _process_start(os.getpid()), "command": " ".join(sys.argv)[:1000],
    }  # fmt: skip
    for _ in range(3):  # a stale lock removed here can be taken by another process first: look again
        if _create(path, owner):
            lock = Lock(path, owner)
            atexit.register(lock.release)
            logger.info("training lock %s taken (PID %d)", path, owner["pid"])
            return lock
        other = _read(path)
        if other is None:  # released in between
            continue
        if other.get("pid") == owner["pid"] and other.get("process_start") == owner["process_start"]:
            return Lock(path, other)  # this process holds it already (a second run of the config in-process)
        if other and other.get("host") != owner["host"]:
            raise BundleLocked(
                f"{path}: this bundle is locked by a training on another host ({_describe(other)}). If that training "
                f"is over, delete {path} and run again"
            )
        if other and _alive(other):
            raise BundleLocked(
                f"{path}: another training writes into this bundle ({_describe(other)}). Wait for it to end, stop "
                f"it (kill -TERM {other['pid']}: it stops cleanly and this command then resumes it), or give this "
                f"run its own --bundle_root"
            )
        logger.warning("taking over the stale training lock %s: %s is no longer running",
                       path, _describe(other) if other else "its owner (unreadable lock)")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    raise BundleLocked(f"{path}: could not take the training lock (other trainings keep taking it)")
