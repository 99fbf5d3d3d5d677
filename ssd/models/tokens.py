"""Token outputs and patch masking for ViT backbones: what iBOT, DINOv2/v3 and JEPA-style methods consume.

    encode(backbone, images, masks=None, mask_token=None) -> Tokens(cls, registers, patches, pooled)

The backbone stays a plain timm model (`VisionTransformer` with learned position embeddings, registers and
LayerScale, or `Eva`, which timm uses for the DINOv3 RoPE architectures), so its state dict exports unchanged.
Masking follows iBOT and DINOv2: a masked patch's embedding is replaced by a learned mask token *before* the
position embedding is added (RoPE backbones rotate it like any patch). It is done with a forward hook on
`patch_embed`, so timm's own `forward_features` runs unchanged for every architecture it supports (registers,
dynamic image size, RoPE, gradient checkpointing) and an image without masked patches gives exactly the
unmasked result.

Non-ViT backbones (ResNet, ConvNeXt) have no tokens: `encode` gives `pooled` only, and a method that needs
tokens says so at start (`require_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ssd.config import ConfigError


@dataclass
class Tokens:
    pooled: torch.Tensor  # (B, D) what the backbone's own head would see (the class token for global_pool=token)
    cls: torch.Tensor | None = None  # (B, D) after the final norm
    registers: torch.Tensor | None = None  # (B, R, D)
    patches: torch.Tensor | None = None  # (B, N, D), row-major over the patch grid


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


def encode(backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None) -> Tokens:
    """Tokens of `images` (B, 3, H, W); `masks` (B, N) bool marks patches replaced by `mask_token` (D,)."""
    if not has_tokens(backbone):
        if masks is not None:
            raise ValueError(f"{type(backbone).__name__} has no patches to mask")
        return Tokens(pooled=backbone(images))
    handle = None
    if masks is not None:
        if mask_token is None:
            raise ValueError("masks were given without a mask token")
        handle = backbone.patch_embed.register_forward_hook(_mask_hook(masks, mask_token))
    try:
        sequence = backbone.forward_features(images)  # (B, prefix + N, D), final norm applied
    finally:
        if handle is not None:
            handle.remove()
    prefix = backbone.num_prefix_tokens
    has_cls = getattr(backbone, "cls_token", None) is not None
    return Tokens(
        pooled=backbone.forward_head(sequence, pre_logits=True),
        cls=sequence[:, 0] if has_cls else None,
        registers=sequence[:, int(has_cls):prefix],
        patches=sequence[:, prefix:],
    )
