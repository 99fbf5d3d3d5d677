"""DINO self-distillation loss (Caron et al. 2021, Eq. 1-4 and Algorithm 1).

Teacher: softmax((logits - center) / teacher_temp) on the global views, no gradient.
Student: log_softmax(logits / student_temp) on every view.
Loss: cross-entropy H(teacher_i, student_j) averaged over all pairs (i, j) with i != j (a global view is never
matched to itself). After the optimizer step the center moves as an EMA of the teacher's batch-mean logits over
the whole global batch: sums are collected over micro-batches (gradient accumulation) and all-reduced over
processes, so every rank keeps the same center and accumulation matches one large batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd.losses.centering import CenterEMA, at_least_fp32, centered_softmax


def dino_cross_entropy(
    student_logits: torch.Tensor,  # (V_s * B, K), views stacked view-major
    teacher_probs: torch.Tensor,  # (V_t * B, K), the global views, same order as the first student views
    num_student_views: int,
    num_teacher_views: int,
    student_temp: float,
) -> torch.Tensor:
    student_log_probs = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
    student_views = student_log_probs.chunk(num_student_views)
    teacher_views = at_least_fp32(teacher_probs).chunk(num_teacher_views)
    total = student_log_probs.new_zeros(())
    pairs = 0
    for t_index, teacher_view in enumerate(teacher_views):
        for s_index, student_view in enumerate(student_views):
            if s_index == t_index:
                continue
            total = total + torch.sum(-teacher_view * student_view, dim=-1).mean()
            pairs += 1
    return total / pairs


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._center_ema = CenterEMA(center_momentum)  # teacher logits collected since the last update

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return centered_softmax(teacher_logits, self.center, teacher_temp)

    def collect(self, teacher_logits: torch.Tensor) -> None:
        """Adds teacher logits to the statistics of the next `update_center()`."""
        self._center_ema.collect(teacher_logits.detach())

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        num_student_views: int,
        num_teacher_views: int,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, teacher probabilities); the center moves later, in `update_center()`."""
        teacher_logits = teacher_logits.detach()
        probs = self.teacher_probs(teacher_logits, teacher_temp)
        loss = dino_cross_entropy(
            student_logits, probs, num_student_views, num_teacher_views, self.student_temp
        )
        self.collect(teacher_logits)
        return loss, probs

    @torch.no_grad()
    def update_center(self) -> None:
        """EMA step of the center with the mean teacher logits collected since the last call (collective)."""
        self._center_ema.update(self.center)
