"""The per-step flags (loss, non-finite, stop) are read a step late except on steps that log or save, so a GPU is
never waited for on the other steps (ssd/engine/step_flags.py)."""

from __future__ import annotations

import torch

from ssd.config import load_config
from ssd.engine.step_flags import LaggedFlags
from ssd.train import run
from tests.tiny import tiny_overrides


def test_all_but_the_newest_flags_are_read_unless_everything_is_asked():
    flags = LaggedFlags(torch.device("cpu"))
    for step in range(3):
        flags.push(step, torch.tensor([float(step), 0.0, float(step == 1)]))
    older = flags.read(everything=False)
    assert [(f.step, f.loss_sum, f.stop) for f in older] == [(0, 0.0, False), (1, 1.0, True)]
    assert [f.step for f in flags.read(everything=False)] == []  # the newest waits for the next step
    newest = flags.read(everything=True)
    assert [(f.step, f.non_finite) for f in newest] == [(2, False)] and flags.read(everything=True) == []


def test_steps_that_neither_log_nor_save_read_only_earlier_steps(tmp_path, monkeypatch):
    reads = []
    original = LaggedFlags.read

    def recording_read(self, everything):
        newest = self.pending[-1][0]
        result = original(self, everything)
        reads.append((newest, everything, [f.step for f in result]))
        return result

    monkeypatch.setattr(LaggedFlags, "read", recording_read)
    cfg = load_config(None, tiny_overrides(tmp_path, "run", "train.max_steps=8", "log.every_steps=4",
                                           "checkpoint.every_steps=1000", "train.memory_check=false"))
    run(cfg)
    for newest, everything, steps in reads:
        logs_or_saves = (newest + 1) % 4 == 0 or newest + 1 == 8
        assert everything == logs_or_saves, reads
        assert (newest in steps) == logs_or_saves, reads  # a quiet step never waits for its own flags
    assert sorted(step for *_, steps in reads for step in steps) == list(range(8))  # every step checked once
