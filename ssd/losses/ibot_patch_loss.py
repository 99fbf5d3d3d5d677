"""iBOT masked-patch self-distillation loss (Zhou et al. 2022, Eq. 2; DINOv2's iBOTPatchLoss).

The student sees a global view with some patches replaced by the mask token; for each masked token it predicts
the teacher's distribution for the same token of the unmasked view:
    H = -sum_k t_k * log softmax(s / student_temp)_k
Per image the mean over its masked tokens, then the mean over the B images. An image without masked tokens adds
0 but still counts in the mean over images (iBOT's definition: the loss does not grow when fewer images are
masked). The teacher is centred like DINO's class token, with its own center (iBOT's "center2", momentum 0.9).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd.losses.centering import CenterEMA, at_least_fp32, centered_softmax


def token_cross_entropy(
    student_logits: torch.Tensor,  # (..., K)
    teacher_probs: torch.Tensor,  # (..., K)
    student_temp: float,
) -> torch.Tensor:  # (...), fp32 or fp64
    student_log_probs = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
    return -(at_least_fp32(teacher_probs) * student_log_probs).sum(dim=-1)


def ibot_patch_cross_entropy(
    student_patch_logits: torch.Tensor,  # (B, N, K)
    teacher_patch_probs: torch.Tensor,  # (B, N, K), the same view's tokens
    masks: torch.Tensor,  # (B, N) bool, True where the student saw the mask token
    student_temp: float,
) -> torch.Tensor:
    per_token = token_cross_entropy(student_patch_logits, teacher_patch_probs, student_temp)  # (B, N)
    # where() rather than a product: an unmasked token's value (possibly inf from padding) must not leak in.
    masked = torch.where(masks, per_token, per_token.new_zeros(()))
    per_image = masked.sum(dim=-1) / masks.sum(dim=-1).clamp(min=1)  # (B,)
    return per_image.mean()


def masked_token_weights(masks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, N) bool -> (M,) weight 1 / (masked tokens of its image), in the order of `tensor[masks]`."""
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(dtype)  # (B,)
    return per_image[:, None].expand(masks.shape)[masks]


def ibot_masked_cross_entropy(
    student_logits: torch.Tensor,  # (M, K), only the masked tokens (the heads run on these alone)
    teacher_probs: torch.Tensor,  # (M, K)
    token_weights: torch.Tensor,  # (M,), from masked_token_weights
    num_images: int,  # B: images without masked tokens still count, as in ibot_patch_cross_entropy
    student_temp: float,
) -> torch.Tensor:
    per_token = token_cross_entropy(student_logits, teacher_probs, student_temp)  # (M,)
    return (per_token * token_weights.to(per_token.dtype)).sum() / num_images


class IBOTPatchLoss(nn.Module):
    """Centred teacher + gathered masked-token loss. Defaults: iBOT / DINOv2 (student_temp 0.1, momentum 0.9)."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.register_buffer("center", torch.zeros(1, patch_out_dim))
        self._center_ema = CenterEMA(center_momentum)

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return centered_softmax(teacher_logits, self.center, teacher_temp)

    def collect(self, teacher_logits: torch.Tensor) -> None:
        """Adds teacher logits to the statistics of the next `update_center()`."""
        self._center_ema.collect(teacher_logits.detach())

    def forward(
        self,
        student_logits: torch.Tensor,  # (M, K)
        teacher_logits: torch.Tensor,  # (M, K)
        token_weights: torch.Tensor,  # (M,)
        num_images: int,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, teacher probabilities); the center moves later, in `update_center()`."""
        teacher_logits = teacher_logits.detach()
        probs = self.teacher_probs(teacher_logits, teacher_temp)
        loss = ibot_masked_cross_entropy(student_logits, probs, token_weights, num_images, self.student_temp)
        self.collect(teacher_logits)
        return loss, probs

    def update_center(self) -> None:
        """After the optimizer step; collective across processes."""
        self._center_ema.update(self.center)
