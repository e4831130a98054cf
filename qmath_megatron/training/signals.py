"""Preemption-safe exits: signals and wall-clock limits, agreed by all ranks.

As Megatron-LM's ``DistributedSignalHandler``: a configured signal (Slurm sends SIGTERM
on preemption and at the time limit; SIGUSR1/SIGUSR2 with ``--signal``; Ctrl-C sends
SIGINT) only sets a flag; a second SIGINT after it raises ``KeyboardInterrupt`` at once.
At the next step boundary every rank contributes its flag (and whether
``train.exit_duration_minutes`` has passed) to one all-reduce (MAX), so all ranks take the
same decision at the same iteration even when the signal reached them at different
moments; the loop then saves a checkpoint and returns, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import torch

logger = logging.getLogger(__name__)


class ExitSignalHandler:
    """Context manager installing the handlers (main thread only); :meth:`should_exit` is
    the collective check made once per step."""

    def __init__(
        self,
        signal_names: list[str],
        duration_minutes: float | None = None,
        start_time: float | None = None,
    ):
        self.signals = [getattr(signal, name) for name in signal_names]
        self.deadline = (
            (start_time or time.time()) + duration_minutes * 60 if duration_minutes else None
        )
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            # A second Ctrl-C: the user does not want to wait for the checkpoint.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received is None:
            logger.warning(
                "received %s: saving a checkpoint and exiting after this step",
                signal.Signals(signum).name,
            )
        self.received = signum

    def __enter__(self) -> ExitSignalHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_exit(self) -> str | None:
        """Collective over the world: the reason to stop now (same on every rank) or None."""
        import torch.distributed as dist

        local = [
            1.0 if self.received is not None else 0.0,
            1.0 if self.deadline is not None and time.time() >= self.deadline else 0.0,
        ]
        flags = torch.tensor(local, dtype=torch.float32)
        if torch.cuda.is_available():
            flags = flags.cuda()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item() > 0:
            name = signal.Signals(self.received).name if self.received else "signal"
            return f"exit signal ({name})"
        if flags[1].item() > 0:
            return "train.exit_duration_minutes reached"
        return None
