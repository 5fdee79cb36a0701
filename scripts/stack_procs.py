"""Process groups of the live stack (:class:`scripts.stack.Stack`): finding a process's descendants (from
/proc), signalling whole groups, and stopping what an earlier run with the same home left behind.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

PIDS_FILE = "stack-pids.json"


def _pgid_or_none(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(roots: set[int]) -> set[int]:
    """Every live descendant of ``roots`` (from /proc; empty where /proc is not available)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def stop_stale(home: Path) -> None:
    """Stop the processes a previous run with this ``home`` left behind (e.g. after ``kill -9`` of the demo).

    Only pids recorded in ``<home>/stack-pids.json`` whose command line still contains the recorded
    marker (so a recycled pid is never touched) are signalled, by process group.
    """
    pids_file = home / PIDS_FILE
    if not pids_file.exists():
        return
    for pid, marker in json.loads(pids_file.read_text()).values():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and _pgid_or_none(pid) == pid:
            for pgid in {pid} | {p for d in _descendants({pid}) if (p := _pgid_or_none(d))}:
                _signal_group(pgid, signal.SIGKILL)
    pids_file.unlink(missing_ok=True)
