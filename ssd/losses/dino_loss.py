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

from ssd.engine.distributed import all_reduce_sum


def at_least_fp32(values: torch.Tensor) -> torch.Tensor:
    """Softmax over 65k prototypes in bf16 loses too much; compute in fp32 (or fp64 when given)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


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
        self._pending: list | None = None  # [sum of teacher logits (1, K), count] since the last update

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((at_least_fp32(teacher_logits) - self.center) / teacher_temp, dim=-1)

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
        self._collect(teacher_logits)
        return loss, probs

    @torch.no_grad()
    def _collect(self, teacher_logits: torch.Tensor) -> None:
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)  # (1, K); the center buffer is fp32
        if self._pending is None:
            self._pending = [batch_sum, teacher_logits.shape[0]]
        else:
            self._pending[0] += batch_sum
            self._pending[1] += teacher_logits.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        """EMA step of the center with the mean teacher logits collected since the last call."""
        if self._pending is None:
            return
        batch_sum, count = self._pending
        self._pending = None
        # One all-reduce of [sum | count] keeps the ranks' centers identical.
        packed = all_reduce_sum(torch.cat([batch_sum.flatten(), batch_sum.new_tensor([count])]))
        batch_center = (packed[:-1] / packed[-1]).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
