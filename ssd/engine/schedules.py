"""Per-step schedules, all pure functions of the step so a resumed run gets identical values."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (held at `end` afterwards)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, end: float) -> float:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine down to `end` (DINO's lr schedule)."""
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linear_warmup_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over `warmup_steps`, then constant (DINO's teacher temperature)."""
    if step >= warmup_steps or warmup_steps <= 0:
        return end
    return start + (end - start) * step / warmup_steps


class TrainingSchedule:
    """Every scheduled quantity of a run, derived from the config and the number of steps per epoch."""

    def __init__(self, cfg, steps_per_epoch: int, world_batch: int):
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        # DINO scales the lr linearly with the batch (reference 256); DINOv2 with its square root (reference 1024).
        ratio = world_batch / cfg.optim.lr_reference_batch
        self.peak_lr = cfg.optim.base_lr * (math.sqrt(ratio) if cfg.optim.lr_scaling == "sqrt" else ratio)
        self.cfg = cfg

    def describe(self) -> str:
        """One line saying which schedule the run follows (a short train.max_steps compresses all of it)."""
        optim, spe = self.cfg.optim, self.steps_per_epoch
        length = (f"train.max_steps={self.cfg.train.max_steps} (the whole schedule is fitted into these steps)"
                  if self.cfg.train.max_steps else f"train.epochs={self.cfg.train.epochs} x {spe} steps")
        shape = ("then constant" if optim.schedule == "constant"
                 else f"then cosine to {optim.min_lr:g} at step {self.total_steps}")
        warmup = optim.warmup_epochs * spe
        cut = f" (optim.warmup_epochs asks for {warmup}: cut to the run)" if warmup > self.total_steps else ""
        return (f"schedule: {self.total_steps} steps from {length}; lr warmup over {min(warmup, self.total_steps)} "
                f"steps{cut} to {self.peak_lr:.3g}, {shape}")

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def __call__(self, step: int) -> dict:
        optim, method = self.cfg.optim, self.cfg.method
        spe = self.steps_per_epoch
        warmup = optim.warmup_epochs * spe
        if optim.schedule == "constant":
            # DINOv3: after the lr warmup, lr, weight decay and teacher momentum stay at their start values, so a
            # run can go on for as long as wanted (and be extended) without a schedule that depends on its end.
            lr = linear_warmup_constant(step, warmup, 0.0, self.peak_lr)
            weight_decay, momentum = optim.weight_decay, method.momentum_teacher
        else:
            lr = warmup_cosine(step, self.total_steps, warmup, self.peak_lr, optim.min_lr)
            weight_decay = cosine(step, self.total_steps, optim.weight_decay, optim.weight_decay_end)
            momentum = cosine(step, self.total_steps, method.momentum_teacher, method.momentum_teacher_end)
        return {
            "step": step,
            "lr": lr,
            "weight_decay": weight_decay,
            "teacher_momentum": momentum,
            "teacher_temp": linear_warmup_constant(
                step, method.warmup_teacher_temp_epochs * spe, method.warmup_teacher_temp, method.teacher_temp
            ),
            "patch_teacher_temp": linear_warmup_constant(
                step, method.warmup_teacher_temp_epochs * spe, method.warmup_patch_teacher_temp,
                method.patch_teacher_temp,
            ),
            "freeze_last_layer": step < optim.freeze_last_layer_epochs * spe,
        }
