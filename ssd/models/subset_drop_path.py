"""Stochastic depth that skips the dropped samples' compute (`model.drop_path_subset=true`; DINOv2's choice).

timm's DropPath runs a block's residual branch (attention, MLP) on the whole batch and then multiplies the
dropped samples' residual by 0 and the kept ones' by 1 / (1 - p). Here the branch runs on a random subset of
round-down(B (1 - p)) samples (at least one), drawn without replacement, and their residuals are added scaled by
B / (kept): at drop rate p a block's training forward and backward cost about (1 - p) of the full one. When
B (1 - p) is a whole number every sample is kept with probability 1 - p and scaled by 1 / (1 - p), exactly as
with DropPath, so each sample's output has the same distribution (the draws of a batch are no longer independent).

In eval mode, at rate 0, or with an attention mask, a block runs as timm wrote it. The block's parameters and
state dict do not change: exports stay plain timm models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block


def add_residual_on_subset(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
                           rate: float) -> torch.Tensor:
    """x + branch(x) in expectation, computing branch on the kept rows of x (B, ...) only."""
    batch = x.shape[0]
    kept = max(int(batch * (1.0 - rate)), 1)
    rows = torch.randperm(batch, device=x.device)[:kept]
    residual = branch(x[rows])
    return torch.index_add(x, 0, rows, residual.to(x.dtype), alpha=batch / kept)


def _rate(drop_path: nn.Module) -> float:
    return float(drop_path.drop_prob) if isinstance(drop_path, DropPath) else 0.0


class SubsetDropPathBlock(Block):
    """timm's ViT block, its residual branches computed on the kept samples only while training."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if not self.training or attn_mask is not None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = _add(x, lambda y: self.ls1(self.attn(self.norm1(y), is_causal=is_causal)), self.drop_path1)
        return _add(x, lambda y: self.ls2(self.mlp(self.norm2(y))), self.drop_path2)


class SubsetDropPathEvaBlock(EvaBlock):
    """timm's Eva block (DINOv3's RoPE ViTs); the rotary embedding is per position, shared by every sample."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False):
        if not self.training or attn_mask is not None or (rope is not None and rope.dim() > 2):
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)

        def attention(y):
            out = self.attn(self.norm1(y), rope=rope, is_causal=is_causal)
            return out if self.gamma_1 is None else self.gamma_1 * out

        def mlp(y):
            out = self.mlp(self.norm2(y))
            return out if self.gamma_2 is None else self.gamma_2 * out

        return _add(_add(x, attention, self.drop_path1), mlp, self.drop_path2)


def _add(x: torch.Tensor, branch, drop_path: nn.Module) -> torch.Tensor:
    rate = _rate(drop_path)
    return add_residual_on_subset(x, branch, rate) if rate > 0 else x + branch(x)


SUBSET_CLASSES = {Block: SubsetDropPathBlock, EvaBlock: SubsetDropPathEvaBlock}


def use_subset_drop_path(backbone: nn.Module) -> int:
    """Switch the backbone's ViT blocks to the subset forward in place; returns how many were switched. Blocks
    of other classes (a subclass timm adds later, a CNN) are left alone."""
    switched = 0
    for block in getattr(backbone, "blocks", ()):
        subset_class = SUBSET_CLASSES.get(type(block))
        if subset_class is not None:
            block.__class__ = subset_class
            switched += 1
    return switched
