"""Distance between a student's patch tokens and a teacher's dense targets, token by token (PH-Reg, Chen et al.
2025, "Vision Transformers with Self-Distilled Registers").

    cosine      1 - cos(student, target), averaged over tokens: matches directions only
    l2          mean squared error over every element: matches the features themselves, scale included
    smooth_l1   smooth L1 (beta 1) over every element
    cosine_l2   cosine + l2, PH-Reg's loss (its released training code adds the two with weight 1)

Unlike feature distillation into another network (ssd/losses/feature_loss.py), the targets are NOT
layer-normalised: the student is the teacher's own network with registers added, and it must keep the
teacher's feature space, scale included, so that everything built on the original features still reads it.
Computed in at least fp32; the targets are expected detached.
"""

from __future__ import annotations

import torch

from ssd.losses.feature_loss import feature_distillation_loss
from ssd.losses.latent_loss import latent_regression_loss

KINDS = ("cosine", "smooth_l1", "l2", "cosine_l2")


def dense_distill_loss(student: torch.Tensor, targets: torch.Tensor, kind: str = "cosine_l2") -> torch.Tensor:
    """student, targets (B, N, D) -> scalar."""
    if kind not in KINDS:
        raise ValueError(f"unknown dense distillation loss '{kind}'; choose one of {', '.join(KINDS)}")
    if student.shape != targets.shape:
        raise ValueError(f"student {tuple(student.shape)} and targets {tuple(targets.shape)} differ in shape")
    loss = student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    if kind in ("cosine", "cosine_l2"):
        loss = loss + feature_distillation_loss(student, targets, kind="cosine")
    if kind in ("l2", "cosine_l2"):
        loss = loss + latent_regression_loss(student, targets, kind="l2", normalize_targets=False)
    if kind == "smooth_l1":
        loss = loss + latent_regression_loss(student, targets, kind="smooth_l1", normalize_targets=False)
    return loss
