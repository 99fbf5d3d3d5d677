"""KoLeo regulariser (Kozachenko-Leonenko entropy estimator; Sablayrolles et al. 2019, used by DINOv2).

Spreads the student's class tokens over the sphere: for each L2-normalised feature, the distance d_i to its
nearest other feature in the batch, loss = -mean_i log(d_i + eps). DINOv2 weights it by 0.1 and applies it to
each global view separately (neighbours are searched within one view, never between two crops of an image).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd.losses.centering import at_least_fp32

DINOV2_KOLEO_WEIGHT = 0.1  # dinov2/configs/ssl_default_config.yaml: dino.koleo_loss_weight


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:  # (B, D) -> scalar
    features = F.normalize(at_least_fp32(features), p=2, dim=-1, eps=eps)
    if features.shape[0] < 2:
        # No neighbour to be far from: 0, but still attached to the graph so backward() works.
        return features.sum() * 0.0
    with torch.no_grad():
        # The neighbour index is a discrete choice (no gradient), so -inf on the diagonal is safe here.
        similarity = features @ features.T  # (B, B)
        similarity.fill_diagonal_(float("-inf"))
        neighbour = similarity.argmax(dim=1)  # (B,)
    # pairwise_distance computes ||x - y + eps||: a duplicate image gives a finite distance and gradient.
    distances = F.pairwise_distance(features, features[neighbour], p=2, eps=eps)  # (B,)
    return -torch.log(distances + eps).mean()


def grouped_koleo_loss(features: torch.Tensor, group_size: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """koleo_loss within consecutive groups of `group_size` rows, averaged over the groups; 0: one group.

    DINOv2 and DINOv3 compute KoLeo on each GPU's share of the batch (64 images in their released configs;
    dinov3's koleo_loss_distributed=false), and averaging gradients over the GPUs makes the loss this mean: with
    group_size = the images per GPU of the official run, ssd's KoLeo is theirs on any number of processes. The
    nearest neighbour among 64 images is farther than among 2048, so the group size sets the term's strength."""
    if group_size <= 0 or group_size >= len(features):
        return koleo_loss(features, eps)
    if len(features) % group_size:
        raise ValueError(f"KoLeo groups of {group_size} do not divide a batch of {len(features)}")
    return torch.stack([koleo_loss(group, eps) for group in features.split(group_size)]).mean()


class KoLeoLoss(nn.Module):
    """Sum over views of koleo_loss(view), as DINOv2 sums the two global crops (weight applied by the method)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor, num_views: int = 1) -> torch.Tensor:  # (V * B, D), view-major
        return sum(koleo_loss(view, self.eps) for view in features.chunk(num_views))
