"""Gram anchoring (DINOv3, Siméoni et al. 2025): keep the student's patch-to-patch similarities close
to those of an earlier "Gram teacher" checkpoint, which stops dense features degrading in long training while
leaving the features themselves free to move (only their pairwise structure is anchored).

    G = X X^T per image, X the (L2-normalised) patch features (N, D)
    loss = mean over images b and entries (i, j) of (G_student[b, i, j] - G_teacher[b, i, j])^2
i.e. the MSE of DINOv3's GramLoss (nn.MSELoss over the (B, N, N) matrices), the teacher side detached.
With remove_diagonal the mean runs over the B * N * (N - 1) off-diagonal entries only (after normalisation the
diagonal is 1 on both sides and only dilutes the mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd.losses.centering import at_least_fp32


def gram_matrices(patches: torch.Tensor, normalize: bool = True) -> torch.Tensor:  # (B, N, D) -> (B, N, N)
    patches = at_least_fp32(patches)  # bf16 inner products over D ~ 1k lose the small differences anchored here
    if normalize:
        patches = F.normalize(patches, p=2, dim=-1)
    return patches @ patches.transpose(-1, -2)


def gram_loss(
    student_patches: torch.Tensor,  # (B, N, D)
    gram_teacher_patches: torch.Tensor,  # (B, N, D), same images and token order
    normalize: bool = True,
    remove_diagonal: bool = False,
) -> torch.Tensor:
    student_gram = gram_matrices(student_patches, normalize)
    with torch.no_grad():
        teacher_gram = gram_matrices(gram_teacher_patches.detach(), normalize)
    squared = (student_gram - teacher_gram.to(student_gram.dtype)) ** 2  # (B, N, N)
    if not remove_diagonal:
        return squared.mean()
    batch, tokens = squared.shape[:2]
    off_diagonal = ~torch.eye(tokens, dtype=torch.bool, device=squared.device)  # (N, N)
    # clamp: with a single token there is no off-diagonal entry and the loss is 0, not 0 / 0.
    return (squared * off_diagonal).sum() / max(batch * tokens * (tokens - 1), 1)
