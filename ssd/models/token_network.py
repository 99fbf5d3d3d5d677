"""A ViT with a class-token head and a patch-token head: the student (and, as a copy, the teacher) of the
masked methods (iBOT, DINOv2, DINOv3).

State-dict keys stay `backbone.*` (a plain timm model, what export and evaluation read), `head.*`,
`patch_head.*` (only with a separate patch head) and `mask_token`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssd.models.tokens import Tokens, encode


class TokenNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, patch_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head  # None: the class head also scores patches (iBOT's shared head)
        # Zeros, as iBOT and DINOv2 initialise it; it only ever replaces patch embeddings.
        self.mask_token = nn.Parameter(torch.zeros(backbone.num_features))

    def encode(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> Tokens:
        return encode(self.backbone, images, masks, self.mask_token if masks is not None else None)

    def score_patches(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (M, K_patch) with the patch head (or the shared head)."""
        return (self.patch_head or self.head)(patch_tokens)
