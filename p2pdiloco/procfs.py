"""Reading processes from /proc (Linux): the one place that parses /proc/<pid>/stat.

The command name (field 2) may hold spaces and parentheses, so the fields are those after its
last ')': [0] state, [1] parent pid, [2] process group, [11] user and [12] system CPU in clock ticks,
[19] start time (with the pid, it names one process: a pid may be reused).
"""
from __future__ import annotations

import os

STATE, PPID, PGRP, UTIME, STIME, STARTTIME = 0, 1, 2, 11, 12, 19


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None if the process is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > STARTTIME else None


def pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def cpu_seconds(fields: list[str]) -> float:
    """User + system CPU seconds from a process's stat fields."""
    return (int(fields[UTIME]) + int(fields[STIME])) / os.sysconf("SC_CLK_TCK")


def is_zombie_or_gone(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is None or fields[STATE] == "Z"
