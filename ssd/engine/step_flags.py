"""The per-step decisions (loss value, non-finite loss, stop request) without stalling the GPU on every step.

Every step all-reduces one small tensor [loss summed over processes, non-finite flag, stop flag], so that all
processes take the same decision at the same step. Reading it on the host is a synchronisation: the host waits
until the GPU has finished everything queued before the read, and the next step cannot be queued meanwhile. So
each step's flags start a copy to pinned host memory right after the all-reduce (before the optimizer's kernels
are queued), and are read one step later, once the next step's work is queued: by then the copy is long done and
the GPU stays busy. Steps that log, save or end read their own flags at once (they synchronise anyway).

The cost of the lag: a non-finite loss is noticed one step after it happened (its update has then been applied;
the weights are not saved, since a checkpoint refuses non-finite weights, and the error names the step it
happened at and the newest usable checkpoint), and a stop request one step later (the run then saves one step
further on). On CPU the copy is immediate and nothing changes but the order of the checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepFlags:
    step: int  # the step (0-based) these flags belong to
    loss_sum: float  # over processes
    non_finite: bool
    stop: bool


class LaggedFlags:
    def __init__(self, device: torch.device):
        self.device = device
        self.pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []

    def push(self, step: int, flags: torch.Tensor) -> None:
        """Start the host copy of step `step`'s flags (call right after their all-reduce)."""
        if self.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((step, host, event))
        else:
            self.pending.append((step, flags, None))

    def read(self, everything: bool) -> list[StepFlags]:
        """The flags of every pending step but the newest (`everything`: of all of them), oldest first."""
        ready = self.pending if everything else self.pending[:-1]
        self.pending = [] if everything else self.pending[-1:]
        results = []
        for step, values, event in ready:
            if event is not None:
                event.synchronize()  # waits for that copy only, not for the work queued after it
            loss_sum, non_finite, stop = values.tolist()
            results.append(StepFlags(step, loss_sum, non_finite > 0, stop > 0))
        return results
