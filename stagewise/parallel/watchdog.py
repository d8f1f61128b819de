"""A rank must not outlive its launcher: a killed launcher's ranks exit by themselves.

    exit_with_launcher()      # once per rank, when started by a launcher (runtime.start_run)
"""

from __future__ import annotations

import os
from pathlib import Path

_watching_launcher = False


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """A rank outlives its launcher when the launcher is killed (SIGKILL, OOM killer): torch elastic
    starts ranks in sessions of their own, so nothing stops them, and an orphan would keep training
    and writing into the run's directory next to a resumed run. A daemon thread notices the parent
    is gone (the rank is re-parented), or the launcher `stagewise launch` named in
    STAGEWISE_LAUNCHER_PID is (also when it died before this rank started), and exits at once, like
    a SIGKILL would. Polling rather than PR_SET_PDEATHSIG, which fires when the parent *thread* that
    started us ends."""
    global _watching_launcher
    if _watching_launcher:
        return
    import sys
    import threading
    import time

    given = os.environ.get("STAGEWISE_LAUNCHER_PID", "")  # set by `stagewise launch`, which execs the launcher
    launcher = int(given) if given.isdigit() else None
    parent = os.getppid()
    if parent == 1 and launcher is None:  # a launcher that is PID 1 (in a container): nothing to watch
        return

    def watch() -> None:  # also at once when the launcher died before this rank got here
        while os.getppid() == parent and (launcher is None or _alive(launcher)):
            time.sleep(poll_s)
        print(f"error: rank {os.environ.get('RANK', '?')}: its launcher (pid {launcher or parent}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="stagewise-exit-with-launcher", daemon=True).start()
    _watching_launcher = True


def _alive(pid: int) -> bool:
    """Whether a process exists; on Linux a zombie counts as gone (a killed launcher stays one until reaped)."""
    if Path("/proc/self").is_dir():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
