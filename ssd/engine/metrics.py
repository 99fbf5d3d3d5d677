"""Where numbers go: TensorBoard scalars, a plain `metrics.jsonl`, and a progress bar (main process only)."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger("ssd")


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.board = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(run_dir / "tb"))

    def write(self, step: int, values: dict, group: str = "train") -> None:
        """One line of metrics.jsonl; TensorBoard scalars under ``group/`` (e.g. eval/knn_top1_k20)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.board is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(f"{group}/{name}", value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.board is not None:
            self.board.close()


class ProgressBar:
    """tqdm bar over optimizer steps with images/s and loss; tqdm adds the ETA."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, steps: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
