"""Teacher centering shared by DINO's class-token loss and iBOT's patch loss (Caron et al. 2021, Eq. 4).

The teacher's distribution is softmax((logits - center) / teacher_temp); the center is an EMA of the teacher's
mean logits. The mean must be over the whole global batch, so the sums are kept between optimizer steps
(gradient accumulation) and all-reduced once per step: N processes x M micro-batches move the center exactly
like one big batch. The center itself stays a buffer of the loss module (checkpointed with it); this helper
holds only the pending sums, which are empty at every step boundary and so never need saving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd.engine.distributed import all_reduce_sum


def at_least_fp32(values: torch.Tensor) -> torch.Tensor:
    """Softmax over 65k prototypes in bf16 loses too much; compute in fp32 (or fp64 when given)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """(M, K) logits, (1, K) center -> (M, K) teacher probabilities in fp32 (or fp64)."""
    return F.softmax((at_least_fp32(teacher_logits) - center) / teacher_temp, dim=-1)


class CenterEMA:
    """Collects teacher logits during a step; `update(center)` moves a (1, K) center buffer by one EMA step.

    The buffer is passed in rather than kept here because `module.to()` / `.double()` replace buffer tensors.
    """

    def __init__(self, momentum: float):
        self.momentum = momentum
        self._sum: torch.Tensor | None = None  # (K,) sum of the teacher logits since the last update
        self._count = 0

    @torch.no_grad()
    def collect(self, teacher_logits: torch.Tensor) -> None:  # (M, K); M may be 0 (no masked token here)
        batch_sum = at_least_fp32(teacher_logits.detach()).sum(dim=0)
        self._sum = batch_sum if self._sum is None else self._sum + batch_sum
        self._count += teacher_logits.shape[0]

    @torch.no_grad()
    def update(self, center: torch.Tensor) -> None:
        """Collective when distributed: every rank must call it after the same steps."""
        if self._sum is None:
            return
        # One all-reduce of [sum | count]; ranks may hold different counts (masked tokens per rank vary).
        packed = all_reduce_sum(torch.cat([self._sum, self._sum.new_tensor([self._count])]))
        self._sum, self._count = None, 0
        if packed[-1] == 0:  # nothing was collected on any rank: keep the center
            return
        batch_center = (packed[:-1] / packed[-1]).view_as(center)
        center.mul_(self.momentum).add_(batch_center.to(center.dtype), alpha=1 - self.momentum)
