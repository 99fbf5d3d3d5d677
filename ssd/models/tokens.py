"""Token outputs and patch masking for ViT backbones: what iBOT, DINOv2/v3 and JEPA-style methods consume.

    encode(backbone, images, masks=None, mask_token=None, keep=None) -> Tokens(cls, registers, patches, pooled)

The backbone stays a plain timm model (`VisionTransformer` with learned position embeddings, registers and
LayerScale, or `Eva`, which timm uses for the DINOv3 RoPE architectures), so its state dict exports unchanged.
Masking follows iBOT and DINOv2: a masked patch's embedding is replaced by a learned mask token *before* the
position embedding is added (RoPE backbones rotate it like any patch). It is done with a forward hook on
`patch_embed`, so timm's own `forward_features` runs unchanged for every architecture it supports (registers,
dynamic image size, RoPE, gradient checkpointing) and an image without masked patches gives exactly the
unmasked result.

`keep` (B, K) restricts the transformer to K patches per image, the others never entering the blocks: I-JEPA's
context encoder and MAE's encoder on visible patches. Each kept patch must carry its real position, so the
selection happens after the position embedding (learned, VisionTransformer) and, for RoPE (Eva), the rotary
embedding is gathered with the same indices. Both models already have that point in their forward: the
`patch_drop` slot (timm's random patch dropout), called on (B, prefix + N, D) after `_pos_embed`. For one call
`encode` puts a module there that keeps the given indices instead of random ones; Eva gathers its rotary
embedding with the indices the slot returns. Masking and keeping combine: masked patches become the mask token
first (on the full grid), then `keep` selects; `masks` index the full grid, not the kept patches. A backbone
built with timm's patch_drop_rate > 0 drops nothing at random in a `keep` call: the given indices replace it.
With `keep`, `pooled` is over the kept tokens (avg pooling) and duplicate indices are not checked.

Non-ViT backbones (ResNet, ConvNeXt) have no tokens: `encode` gives `pooled` only, and a method that needs
tokens says so at start (`require_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ssd.config import ConfigError


@dataclass
class Tokens:
    pooled: torch.Tensor  # (B, D) what the backbone's own head would see (the class token for global_pool=token)
    cls: torch.Tensor | None = None  # (B, D) after the final norm
    registers: torch.Tensor | None = None  # (B, R, D)
    patches: torch.Tensor | None = None  # (B, N, D), row-major over the patch grid; (B, K, D) in `keep`'s order


def has_tokens(backbone: nn.Module) -> bool:
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "num_prefix_tokens")


def require_tokens(backbone: nn.Module, method: str) -> None:
    if not has_tokens(backbone):
        raise ConfigError(f"method.name={method} needs patch tokens, which only ViT backbones (timm "
                          f"VisionTransformer / Eva) give; {type(backbone).__name__} has none: choose a vit_* "
                          "model.arch or method.name=dino")


def _mask_hook(masks: torch.Tensor, mask_token: torch.Tensor):
    """patch_embed output (B, H, W, D) with dynamic image size, else (B, N, D) -> masked patches replaced."""

    def replace(_module, _inputs, embeddings: torch.Tensor) -> torch.Tensor:
        if masks.shape != (embeddings.shape[0], embeddings[0, ..., 0].numel()):
            raise ValueError(f"masks of shape {tuple(masks.shape)} do not fit {embeddings[0, ..., 0].numel()} "
                             f"patches of {embeddings.shape[0]} images")
        where = masks.view(*embeddings.shape[:-1], 1)
        return torch.where(where, mask_token.to(embeddings.dtype), embeddings)

    return replace


class _KeepPatches(nn.Module):
    """Stands in `backbone.patch_drop` for one forward: (B, prefix + N, D) -> (B, prefix + K, D).

    VisionTransformer calls the slot as `x = patch_drop(x)`; Eva as `x, keep = patch_drop(x)` and gathers its
    rotary embedding (patches only, prefix tokens are not rotated) with the returned indices.
    """

    def __init__(self, keep: torch.Tensor, num_prefix_tokens: int, return_indices: bool):
        super().__init__()
        self.keep, self.prefix, self.return_indices = keep, num_prefix_tokens, return_indices
        self.called = False

    def forward(self, x: torch.Tensor):
        patches = x[:, self.prefix:]  # (B, N, D)
        if self.keep.shape[0] != x.shape[0]:
            raise ValueError(f"keep has {self.keep.shape[0]} rows for {x.shape[0]} images")
        # One comparison and one sync: an index out of range would otherwise be a device-side assert on GPU.
        if bool(((self.keep < 0) | (self.keep >= patches.shape[1])).any()):
            raise ValueError(f"keep indices must lie in [0, {patches.shape[1]}), the patches of one image")
        self.called = True
        kept = patches.gather(1, self.keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        x = torch.cat([x[:, :self.prefix], kept], dim=1)
        return (x, self.keep) if self.return_indices else x


def _forward_kept(backbone: nn.Module, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if not isinstance(backbone, (VisionTransformer, Eva)):
        raise ValueError(f"keep needs a timm VisionTransformer or Eva (they drop patches after the position "
                         f"embedding); {type(backbone).__name__} is neither")
    if keep.dim() != 2 or keep.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keep must be (B, K) integer indices; got {tuple(keep.shape)} {keep.dtype}")
    keeper = _KeepPatches(keep.long(), backbone.num_prefix_tokens, return_indices=isinstance(backbone, Eva))
    # Swapped in the registry the slot lives in (VisionTransformer: a submodule; Eva without patch dropout: a
    # plain None attribute), so module order and the state dict stay as they were; the keeper has no weights.
    registry = backbone._modules if "patch_drop" in backbone._modules else backbone.__dict__
    original = registry["patch_drop"]
    registry["patch_drop"] = keeper
    try:
        sequence = backbone.forward_features(images)
    finally:
        registry["patch_drop"] = original
    if not keeper.called:  # a subclass whose forward_features skips the slot would silently ignore keep
        raise ValueError(f"{type(backbone).__name__}.forward_features never called patch_drop; keep unsupported")
    return sequence


def encode(backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> Tokens:
    """Tokens of `images` (B, 3, H, W); `masks` (B, N) bool marks patches replaced by `mask_token` (D,);
    `keep` (B, K) long, row-major patch indices, are the only patches the blocks see (`patches` is (B, K, D))."""
    if not has_tokens(backbone):
        if masks is not None or keep is not None:
            raise ValueError(f"{type(backbone).__name__} has no patches to mask or keep")
        return Tokens(pooled=backbone(images))
    handle = None
    if masks is not None:
        if mask_token is None:
            raise ValueError("masks were given without a mask token")
        handle = backbone.patch_embed.register_forward_hook(_mask_hook(masks, mask_token))
    try:
        if keep is None:
            sequence = backbone.forward_features(images)  # (B, prefix + N, D), final norm applied
        else:
            sequence = _forward_kept(backbone, images, keep)  # (B, prefix + K, D)
    finally:
        if handle is not None:
            handle.remove()
    return tokens_of(backbone, sequence)


def tokens_of(backbone: nn.Module, sequence: torch.Tensor) -> Tokens:
    """The parts of a ViT's final, normed token sequence (B, prefix + N, D)."""
    prefix = backbone.num_prefix_tokens
    has_cls = getattr(backbone, "cls_token", None) is not None
    return Tokens(
        pooled=backbone.forward_head(sequence, pre_logits=True),  # with keep: pooled over the kept tokens
        cls=sequence[:, 0] if has_cls else None,
        registers=sequence[:, int(has_cls):prefix],
        patches=sequence[:, prefix:],
    )
