"""Per-parameter lr multipliers for ViTs: layer-wise lr decay (BEiT, DINOv2) and DINOv2's patch-embedding factor.

Layer 0 is everything before the first block (patch embedding, class/register/mask tokens, position
embedding), layer i the i-th block, layer depth + 1 the final norm and the heads. A parameter of layer i gets
lr x decay^(depth + 1 - i): the last layers learn at the full rate, the embedding at the smallest.
"""

from __future__ import annotations

import re
from collections.abc import Callable

EMBEDDING_NAMES = ("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer of a parameter named as in a state dict that holds the backbone under any prefix."""
    block = _BLOCK.search(name)
    if block:
        return int(block.group(1)) + 1
    leaf = name.rsplit(".", 1)[-1]
    if any(f".{part}" in f".{name}" for part in EMBEDDING_NAMES) or leaf in EMBEDDING_NAMES:
        return 0
    return depth + 1


def vit_parameter_groups(method, backbone, optim) -> list[dict]:
    """A method's optimizer groups: weight decay as in DINO, lr multipliers from `optim.layerwise_decay` and
    `optim.patch_embed_lr_mult` over its backbone's blocks (a backbone without blocks has depth 0)."""
    from ssd.engine.optim import parameter_groups

    depth = len(getattr(backbone, "blocks", ()))
    return parameter_groups(method, lr_multipliers(depth, optim.layerwise_decay, optim.patch_embed_lr_mult))


def lr_multipliers(depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> Callable[[str], float] | None:
    """`name -> multiplier`, or None when both factors are 1 (one group per decay setting, as DINO had)."""
    if layerwise_decay == 1.0 and patch_embed_lr_mult == 1.0:
        return None

    def multiplier(name: str) -> float:
        value = layerwise_decay ** (depth + 1 - vit_layer_id(name, depth))
        return value * (patch_embed_lr_mult if ".patch_embed." in f".{name}" else 1.0)

    return multiplier
