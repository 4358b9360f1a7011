"""A peer killed outright (SIGKILL, the OOM killer) leaves nothing running behind it.

hivemind runs the DHT in a forked process, which starts the `p2pd` daemon as its own child. When the
peer process exits normally it shuts both down (control.py); when it is killed, nothing tells them,
and they would serve the DHT and hold their ports forever. So the DHT process watches its parent:
once the peer process is gone (its parent id changes), it stops its own children (`p2pd`:
SIGTERM, then SIGKILL after `GRACE_S`) and exits. Checked every `POLL_S`.
"""
from __future__ import annotations

import os
import signal
import threading
import time

from .. import procfs

POLL_S = 1.0
GRACE_S = 2.0


def children(pid: int) -> list[int]:
    return [child for child in procfs.pids() if (fields := procfs.stat_fields(child)) and int(fields[procfs.PPID]) == pid]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def die_with_parent(parent: int) -> None:
    """Call in the child process (no-op where /proc is missing)."""
    if not os.path.isdir("/proc"):
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        mine = children(os.getpid())
        _signal_all(mine, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in children(os.getpid())):
            time.sleep(0.1)
        _signal_all(children(os.getpid()), signal.SIGKILL)
        os._exit(0)

    threading.Thread(target=watch, name="p2pdiloco-watchdog", daemon=True).start()
