"""Backbone + head applied to a list of crops of mixed resolutions.

Crops of the same resolution are concatenated and go through the backbone in one forward pass (the 2 global
crops together, the local crops together); the head then runs once on all the pooled features.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssd.models.packed_crops import encode_packed


def same_size_groups(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """V tensors (B, 3, H_v, W_v) -> one (V_s * B, 3, H, W) tensor per run of consecutive crops of one size, in
    crop order: a network then runs once per size (the global crops together, the local crops together)."""
    groups, start = [], 0
    for end in range(1, len(crops) + 1):
        if end == len(crops) or crops[end].shape[-2:] != crops[start].shape[-2:]:
            groups.append(torch.cat(crops[start:end]))
            start = end
    return groups


class MultiCropEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.packed = packed  # model.packed_crops: all sizes through the blocks together (ssd/models/packed_crops.py)

    def backbone_features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """crops: V tensors (B, 3, H_v, W_v) -> pooled features (V * B, D), in crop order."""
        groups = same_size_groups(crops)
        if self.packed and len(groups) > 1:
            return torch.cat([tokens.pooled for tokens in encode_packed(self.backbone, groups, [None] * len(groups))])
        return torch.cat([self.backbone(group) for group in groups])

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone_features(crops)  # (V * B, D)
        return features, self.head(features)  # (V * B, D), (V * B, K)
