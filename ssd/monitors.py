"""Collapse monitors for self-distillation (Caron et al. 2021, Sec. 5.3 / Fig. 7).

Two failure modes: every output becomes uniform (per-sample entropy -> log K), or one prototype dominates for
every image (the batch-mean distribution becomes one-hot, KL(mean || uniform) -> log K). A third signal is the
spread of the L2-normalised backbone features across the batch, which falls to 0 when all images map to one point.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

UNIFORM_ENTROPY_RATIO = 0.98  # mean per-sample entropy above this share of log K: collapse to uniform
ONE_HOT_ENTROPY_RATIO = 0.02  # entropy of the batch-mean distribution below this share of log K: one-hot


@torch.no_grad()
def collapse_statistics(teacher_probs: torch.Tensor, teacher_features: torch.Tensor) -> dict:
    """teacher_probs (N, K) rows summing to 1; teacher_features (N, D) -> scalar statistics."""
    probs = teacher_probs.float()
    log_k = math.log(probs.shape[-1])
    sample_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    mean_probs = probs.mean(0)
    mean_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
    normalised = F.normalize(teacher_features.float(), dim=-1)
    feature_std = normalised.std(dim=0).mean() if normalised.shape[0] > 1 else normalised.new_zeros(())
    return {
        "teacher_entropy": sample_entropy.item(),
        "teacher_kl_uniform": (log_k - mean_entropy).item(),
        "teacher_feature_std": feature_std.item(),
        "log_num_prototypes": log_k,
    }


def collapse_kind(stats: dict) -> str | None:
    """'uniform', 'one-hot' or None from the statistics above (None for methods without prototypes)."""
    if "teacher_entropy" not in stats:
        return None
    log_k = stats["log_num_prototypes"]
    if stats["teacher_entropy"] > UNIFORM_ENTROPY_RATIO * log_k:
        return "uniform"
    if log_k - stats["teacher_kl_uniform"] < ONE_HOT_ENTROPY_RATIO * log_k:
        return "one-hot"
    return None
