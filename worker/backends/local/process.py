"""Process groups of running tasks: start times, termination, orphan clean-up.

Each task runs as the leader of its own session (``start_new_session=True``), so
its pid is also its process-group id and killing the group reaches everything the
task started. A pid is only trusted again after a restart if the process still has
the start time recorded when it was launched, so a reused pid is never killed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import structlog

log = structlog.get_logger(__name__)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), else None."""
    # Read once with os-level calls: this runs for every task, and pathlib's text
    # layer cost twice what the read itself does.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # Field 2 (the command name) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False if no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("task.kill_refused", pgid=pgid, signal=sig)
        return False
    return True


def wait_exit(proc: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Wait until the task's leader process exits, without reaping it; True if it did.

    Leaving the leader a zombie keeps its pid (and so the process-group id) from
    being reused while the group is still signalled.
    """
    if proc.returncode is not None:
        return True
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return bool(poller.poll(None if timeout is None else max(timeout, 0) * 1000))
            finally:
                os.close(fd)
    return _poll_exit(proc.pid, timeout)


def _poll_exit(pid: int, timeout: float | None) -> bool:
    """Portable fallback of :func:`wait_exit`: poll ``waitid`` with ``WNOWAIT``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def end_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the task's process group, then SIGKILL it if the leader is still alive
    after ``grace`` seconds. The leader is left for the caller to reap."""
    signal_group(proc.pid, signal.SIGTERM)
    if not wait_exit(proc, grace):
        signal_group(proc.pid, signal.SIGKILL)
        wait_exit(proc, None)


def kill_orphan(pid: int, recorded_start: int | None) -> bool:
    """SIGKILL the process group a dead scheduler left behind, if it is still the same
    process (same start time); return True if a signal was sent."""
    if recorded_start is None:
        log.warning("task.orphan_unverified", pid=pid,
                    detail="no recorded start time; the old process is left alone")
        return False
    if start_time(pid) != recorded_start:
        return False
    try:
        if os.getpgid(pid) != pid:
            return False
    except ProcessLookupError:
        return False
    return signal_group(pid, signal.SIGKILL)
