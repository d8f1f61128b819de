"""SIGTERM / SIGINT: finish the step, write a checkpoint, exit 0 — what schedulers (Slurm, Kubernetes)
send before they kill a job, and what Ctrl-C sends.

    stop = StopRequest.install()        # once per run, in the main thread; restored by .restore()
    if stop.agreed(device):             # collective, once per step: any rank signalled -> all stop
        save_checkpoint(...); return

The handler only sets a flag: the step under way finishes, so no collective is cut in half. Ranks
agree through one all-reduce per step, since a launcher may signal one rank before the others.
A second SIGINT stops at once (KeyboardInterrupt), for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopRequest:
    current: StopRequest | None = None

    def __init__(self):
        self.signal_name: str | None = None  # the signal this process received
        self.stopped_by: str | None = None  # set once the ranks agreed to stop
        self._previous: dict = {}

    @classmethod
    def install(cls) -> StopRequest:
        req = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                req._previous[sig] = signal.signal(sig, req._handle)
        cls.current = req
        return req

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """Collective: True on every rank when any rank has been signalled."""
        from stagewise.parallel.collectives import reduce_sum

        flag = torch.tensor([0.0 if self.signal_name is None else 1.0], device=device)
        if reduce_sum(flag).item() > 0 and self.stopped_by is None:
            self.stopped_by = self.signal_name or "a signal to another rank"
        return self.stopped_by is not None

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        if StopRequest.current is self:
            StopRequest.current = None


def agreed_stop(device) -> bool:
    """Collective, once per training step; False when no StopRequest is installed (library use)."""
    req = StopRequest.current
    return req is not None and req.agreed(device)


def stopped_by() -> str | None:
    req = StopRequest.current
    return None if req is None else req.stopped_by
