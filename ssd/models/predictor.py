"""A narrow ViT that predicts tokens at target positions from context tokens: I-JEPA's predictor (Assran et al.
2023), and with out_dim = patch * patch * 3 a light pixel decoder in the manner of MAE and SALT.

    Predictor(in_dim, grid)(context_tokens (B, K, in_dim), context_index (B, K), target_index (B, M))
        -> (B, M, out_dim)

The context tokens (the encoder's output for the kept patches) are projected to the predictor's width and given
the position of their patch; each target gets the same learned mask token plus its own position. The blocks see
context and targets together; only the targets are read out. Positions are fixed 2D sine-cosine embeddings of
the patch grid, so the predictor's only knowledge of *where* comes from the indices: a token and its index
always travel together and the order of tokens in the sequence does not matter.

Several target blocks per image (I-JEPA samples 4) are predicted independently, each with the whole context but
without seeing the other blocks' mask tokens: the caller repeats the context once per block
(`repeat_for_targets`) and stacks the blocks' indices image-major, giving a batch of B * T.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) float positions -> (P, dim): sin of dim/2 geometric frequencies (1 .. 1/10000), then their cos."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(H*W, dim), row-major: the first half of the features encodes the row, the second half the column."""
    if dim % 4:
        raise ValueError(f"2D sine-cosine positions need a width divisible by 4; got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1).float()


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D) or (N, D) shared by all images, index (B, M) -> (B, M, D)."""
    if tokens.dim() == 2:
        return tokens[index]
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def repeat_for_targets(tokens: torch.Tensor, num_targets: int) -> torch.Tensor:
    """(B, K, ...) -> (B * T, K, ...), image-major: rows b*T .. b*T + T-1 are image b, once per target block."""
    return tokens.repeat_interleave(num_targets, dim=0)


class Predictor(nn.Module):
    def __init__(self, in_dim: int, grid: tuple[int, int], predictor_dim: int = 384, depth: int = 6,
                 num_heads: int = 6, out_dim: int | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_positions = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(in_dim, predictor_dim)
        # A buffer, not a parameter: fixed, never trained. Not persistent: it is a function of (grid, width),
        # recomputed on construction, so checkpoints do not carry it (nor break when the grid changes).
        self.register_buffer("positions", sincos_2d(predictor_dim, self.grid), persistent=False)  # (H*W, P)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.blocks = nn.ModuleList(Block(predictor_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(predictor_dim, eps=1e-6)
        self.out = nn.Linear(predictor_dim, out_dim or in_dim)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_vit)

    def _check(self, index: torch.Tensor, name: str, batch: int) -> None:
        if index.dim() != 2 or index.shape[0] != batch or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be ({batch}, count) integer indices; got {tuple(index.shape)} "
                             f"{index.dtype}")
        # One fused comparison (a single sync); an out-of-range gather would be a device-side assert on GPU.
        if bool(((index < 0) | (index >= self.num_positions)).any()):
            raise ValueError(f"{name} must lie in [0, {self.num_positions}), the {self.grid} patch grid")

    def forward(self, context_tokens: torch.Tensor, context_index: torch.Tensor,
                target_index: torch.Tensor) -> torch.Tensor:
        batch, num_context = context_tokens.shape[:2]
        self._check(context_index, "context_index", batch)
        self._check(target_index, "target_index", batch)
        if context_index.shape[1] != num_context:
            raise ValueError(f"{num_context} context tokens but {context_index.shape[1]} context indices")
        positions = self.positions.to(context_tokens.dtype)
        context = self.embed(context_tokens) + gather_tokens(positions, context_index.long())  # (B, K, P)
        targets = self.mask_token.to(context.dtype) + gather_tokens(positions, target_index.long())  # (B, M, P)
        x = torch.cat([context, targets], dim=1)  # (B, K + M, P)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x[:, num_context:]))  # (B, M, out_dim)


def _init_vit(module: nn.Module) -> None:
    """ViT initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
