"""Feature distillation: the student's (projected) features against a fixed teacher's, vector by vector.

    cosine      1 - cos(student, teacher), averaged over vectors: scale-free, the usual choice for matching a
                self-supervised teacher's embedding (its norm carries little meaning)
    smooth_l1   regression onto the teacher's features layer-normed over channels (as I-JEPA normalises its
    l2          targets, ssd/losses/latent_loss.py), so the loss cannot be lowered by matching the scale only and
                every vector weighs alike
    cosine_l2   the sum of cosine and l2, PH-Reg's loss (Chen et al. 2025; its released code adds the two)

`normalize_targets=False` regresses the targets as they are: PH-Reg's student is the teacher's own network with
registers added and must keep the teacher's feature space, scale included, for whatever reads those features.

Computed in at least fp32 (bf16 sums over wide features lose too much); the teacher side is expected detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd.losses.latent_loss import latent_regression_loss

KINDS = ("cosine", "smooth_l1", "l2", "cosine_l2")


def feature_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine",
                              normalize_targets: bool = True) -> torch.Tensor:
    """student, teacher (..., D) of the same shape -> scalar, the mean over all leading positions."""
    if kind not in KINDS:
        raise ValueError(f"unknown feature loss '{kind}'; choose one of {', '.join(KINDS)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ in shape")
    if kind == "cosine_l2":
        return (feature_distillation_loss(student, teacher, "cosine")
                + feature_distillation_loss(student, teacher, "l2", normalize_targets))
    if kind == "cosine":
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        return (1.0 - F.cosine_similarity(student.to(dtype), teacher.to(dtype), dim=-1, eps=1e-8)).mean()
    width = student.shape[-1]
    return latent_regression_loss(student.reshape(1, -1, width), teacher.reshape(1, -1, width),
                                  kind=kind, normalize_targets=normalize_targets)
