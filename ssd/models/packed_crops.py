"""Crops of several resolutions through a ViT together (`model.packed_crops=true`; DINOv3's choice).

A multi-crop step runs the student on 2 global crops (e.g. 197 tokens each) and 8 local ones (37 tokens): as
separate forwards, every LayerNorm, qkv/projection/MLP matmul and residual add is launched once per resolution.
Packed, each block runs attention per resolution (a crop's tokens attend only to its own) and everything else
once, on the tokens of all crops concatenated (rows of one (sum of B_i x T_i, D) matrix): fewer, larger kernels,
the same arithmetic per token. The result equals separate forwards up to float rounding (tests).

Only timm `VisionTransformer` with its plain `Block` is packed; any other backbone or block class (Eva/RoPE,
`model.drop_path_subset`'s blocks) and a compiled block (`train.compile`) run one crop group at a time, as before.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from ssd.models.tokens import Tokens, _mask_hook, encode, tokens_of


def can_pack(backbone: nn.Module) -> bool:
    return (type(backbone) is VisionTransformer and all(type(block) is Block for block in backbone.blocks)
            and not any("forward" in vars(block) for block in backbone.blocks))  # compiled blocks: not packed


def _rowwise(module: nn.Module, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """A per-token module (norm, MLP) applied to the tokens of all sequences (B_i, T_i, D) in one call."""
    flat = module(torch.cat([sequence.reshape(-1, sequence.shape[-1]) for sequence in sequences]))
    parts = flat.split([sequence.shape[0] * sequence.shape[1] for sequence in sequences])
    return [part.view(*sequence.shape[:2], -1) for part, sequence in zip(parts, sequences)]


def _packed_block(block: Block, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    normed = _rowwise(block.norm1, sequences)
    sequences = [x + block.drop_path1(block.ls1(block.attn(y))) for x, y in zip(sequences, normed)]
    updates = _rowwise(nn.Sequential(block.norm2, block.mlp, block.ls2), sequences)
    return [x + block.drop_path2(update) for x, update in zip(sequences, updates)]


def encode_packed(backbone: nn.Module, images: list[torch.Tensor], masks: list[torch.Tensor | None],
                  mask_token: torch.Tensor | None = None) -> list[Tokens]:
    """Tokens of each (B_i, 3, H_i, W_i) image batch, its `masks` (B_i, N_i) replaced by `mask_token` as in
    `encode`: one pass through the blocks for all of them where the backbone can be packed, else one per batch."""
    if not can_pack(backbone):
        return [encode(backbone, batch, mask, mask_token if mask is not None else None)
                for batch, mask in zip(images, masks)]
    sequences = []
    for batch, mask in zip(images, masks):
        embedded = backbone.patch_embed(batch)
        if mask is not None:
            embedded = _mask_hook(mask, mask_token)(None, None, embedded)
        sequences.append(backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(embedded))))
    for block in backbone.blocks:
        if backbone.grad_checkpointing and torch.is_grad_enabled():  # model.grad_checkpointing, as timm does it
            sequences = checkpoint(_packed_block, block, sequences, use_reentrant=False)
        else:
            sequences = _packed_block(block, sequences)
    return [tokens_of(backbone, sequence) for sequence in _rowwise(backbone.norm, sequences)]
