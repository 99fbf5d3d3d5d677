"""Pooled and dense features of any backbone, in one forward, for distillation between architectures.

    pooled   (B, D)        what the backbone's own head would see (class token, average of tokens, CNN global pool)
    dense    (B, D, h, w)  a ViT's patch tokens laid back on the patch grid, or a CNN's last feature map

A ViT student can thus learn a CNN teacher's pooled embedding, and a CNN student a ViT teacher's patch tokens
(the student's map is resized to the teacher's grid before the loss, see `resize_to`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd.models.backbone import patch_size_of
from ssd.models.tokens import encode, has_tokens


def pooled_and_dense(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) -> pooled (B, D), dense (B, D, h, w)."""
    if has_tokens(backbone):
        tokens = encode(backbone, images)
        patch = patch_size_of(backbone)
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        dense = tokens.patches.transpose(1, 2).reshape(len(images), -1, *grid)  # (B, D, h, w)
        return tokens.pooled, dense
    feature_map = backbone.forward_features(images)
    if feature_map.dim() != 4:
        raise ValueError(f"{type(backbone).__name__}.forward_features gave shape {tuple(feature_map.shape)}, not a "
                         "(B, C, h, w) feature map: distil its pooled features only (distill.targets=pooled)")
    return backbone.forward_head(feature_map, pre_logits=True), feature_map


def resize_to(dense: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, D, h, w) -> (B, D, *grid), bilinear (area-averaged when shrinking); unchanged when it already fits."""
    if tuple(dense.shape[-2:]) == tuple(grid):
        return dense
    shrinking = dense.shape[-2] >= grid[0] and dense.shape[-1] >= grid[1]
    return F.interpolate(dense, size=grid, mode="area" if shrinking else "bilinear",
                         **({} if shrinking else {"align_corners": False}))


def build_projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The learned map from the student's width to the teacher's: one linear layer, or a two-layer MLP (GELU)
    with a hidden width of max(in, out), acting on the last dimension."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = max(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ValueError(f"unknown projection '{kind}'; choose linear or mlp")
