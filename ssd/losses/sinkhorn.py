"""Sinkhorn-Knopp teacher centering (SwAV, Caron et al. 2020; DINOv2 replaces DINO's EMA center with it).

Turns teacher logits into an assignment Q (B, K) whose rows (samples) each sum to 1 and whose prototype
marginals are pushed towards uniform (B / K each) over the GLOBAL batch, which prevents collapse onto a few
prototypes without a running center. Every sum over samples is all-reduced, so N processes with B / N samples
each get exactly the rows one process with all B samples would get. Shards may differ in size (DINOv2 uses
it on the masked patch tokens, whose count differs per rank). 3 iterations: SwAV's and DINOv2's default.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ssd.engine.distributed import all_reduce_sum, is_distributed
from ssd.losses.centering import at_least_fp32


def _all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


@torch.no_grad()  # a teacher target: never differentiated
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, iterations: int = 3) -> torch.Tensor:
    """(B, K) logits -> (B, K) probabilities, fp32 (fp64 when given fp64)."""
    scores = at_least_fp32(teacher_logits) / teacher_temp  # (B, K)
    num_prototypes = scores.shape[1]
    # Shift each prototype by its max over the global batch: this scales row k of Q by a constant, which the
    # first prototype normalisation divides out exactly, so the result is that of the unshifted algorithm.
    # Without it exp() overflows fp32 once logits / temp > 88; a per-prototype (not global) max also keeps a
    # prototype that no sample likes from underflowing to an all-zero row (0 / 0 below).
    if scores.shape[0] > 0:
        prototype_max = scores.max(dim=0).values  # (K,)
    else:  # this rank holds no sample (e.g. no masked token), the others decide
        prototype_max = scores.new_full((num_prototypes,), float("-inf"))
    q = torch.exp(scores - _all_reduce_max(prototype_max)).T  # (K, B_local)

    # Total mass and global batch size in one all-reduce.
    total, global_batch = all_reduce_sum(torch.stack([q.sum(), q.new_tensor(float(q.shape[1]))]))
    q /= total
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype's mass over the global batch ...
        q /= num_prototypes  # ... becomes 1 / K
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass (local: a column lives on one rank) ...
        q /= global_batch  # ... becomes 1 / B_total
    q *= global_batch  # each sample's probabilities sum to 1
    return q.T
