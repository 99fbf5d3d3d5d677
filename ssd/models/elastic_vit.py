"""Elastic ViT (POA, Zhang et al. ECCV 2024, Sec. 3.2): sub-networks of a timm VisionTransformer that share its
weights, for the elastic student during training and for extracting standalone models afterwards.

A sub-network of width W and depth d keeps, of an intact ViT of width D and L blocks:
- width: the first W channels of the embedding (patch-embedding output channels, class/register tokens, position
  embedding, every LayerNorm and LayerScale), the first W / head_dim attention heads (the first W rows of each of
  q, k and v: the head dimension stays) and the first W / D of every MLP's hidden units;
- depth: d of the L blocks, evenly spaced from the first to the last, floor(linspace(0, L - 1, d)) (POA's
  block selection, so a shallow sub-network still starts with the stem's block and ends with the last one).

POA's dynamic linear layers scale an input cut from D_in to W_in channels by D_in / W_in, which keeps each output's
magnitude as channels are dropped; here that factor is folded into the sliced weight, the form in which POA's
extraction tool also writes it. The sub-network therefore *is* a plain timm VisionTransformer of that size
(embed_dim=W, depth=d, num_heads=W / head_dim): `ElasticViT` builds it once per size on the meta device and runs
it with `torch.func.functional_call` on slices of the intact network's parameters. Gradients flow into the shared
parameters, every timm feature of the intact model (registers, LayerScale, dynamic image size, pooling) behaves
as in the intact forward, and an extracted model holds exactly the tensors the elastic forward used.
"""

from __future__ import annotations

import re

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

# Parameters cut to the first W channels along their last dimension (LayerNorms, LayerScales and tokens).
_EMBEDDING_VECTORS = re.compile(r"^(cls_token|reg_token|pos_embed|norm_pre\..*|norm\..*|fc_norm\..*|patch_embed\.norm\..*"
                                r"|blocks\.\d+\.(norm1|norm2|attn\.norm)\..*|blocks\.\d+\.ls[12]\.gamma)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def kept_blocks(full_depth: int, depth: int) -> list[int]:
    """Indices of the `depth` blocks a sub-network keeps out of `full_depth`, evenly spaced, first and last kept."""
    return np.linspace(0, full_depth - 1, depth).astype(np.int64).tolist()


def _slice_block_tensor(name: str, tensor: torch.Tensor, width: int, hidden: int, scale: float) -> torch.Tensor:
    """One tensor of a block (`name` without the `blocks.i.` prefix) cut to width `width` and `hidden` MLP units;
    weights whose input is cut are multiplied by `scale` (1.0 at full width: the tensor itself, no copy)."""
    def scaled(weight: torch.Tensor) -> torch.Tensor:
        return weight if scale == 1.0 else weight * scale

    if name == "attn.qkv.weight":  # (3 D, D): q, k and v each keep their first W rows (the first heads)
        return scaled(tensor.unflatten(0, (3, -1))[:, :width, :width].flatten(0, 1))
    if name == "attn.qkv.bias":
        return tensor.unflatten(0, (3, -1))[:, :width].flatten()
    if name.startswith(("attn.q_norm.", "attn.k_norm.")):  # over the head dimension, which does not change
        return tensor
    if name == "attn.proj.weight":
        return scaled(tensor[:width, :width])
    if name == "mlp.fc1.weight":
        return scaled(tensor[:hidden, :width])
    if name == "mlp.fc2.weight":
        return scaled(tensor[:width, :hidden])
    if name == "mlp.fc1.bias" or name.startswith("mlp.norm."):
        return tensor[:hidden]
    if name in ("attn.proj.bias", "mlp.fc2.bias"):
        return tensor[:width]
    raise ValueError(f"the elastic ViT does not know how to cut the block parameter '{name}' (timm's plain "
                     "VisionTransformer blocks with an MLP are supported)")


def slice_vit_weights(weights: dict[str, torch.Tensor], width: int, depth: int) -> dict[str, torch.Tensor]:
    """The weights of the (width, depth) sub-network of a timm VisionTransformer's `weights` (its parameters or
    state dict), named as in a VisionTransformer of that size (kept blocks renumbered 0..depth-1). Works on
    parameters (the slices stay differentiable views) and on plain tensors (extraction)."""
    full_width = weights["patch_embed.proj.weight"].shape[0]
    full_depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, weights) if m)
    renumber = {old: new for new, old in enumerate(kept_blocks(full_depth, depth))}
    scale = full_width / width  # POA's input scaling of every linear layer whose input was cut, folded in
    sliced = {}
    for name, tensor in weights.items():
        block = _BLOCK.match(name)
        if block and int(block.group(1)) not in renumber:
            continue
        if _EMBEDDING_VECTORS.match(name):
            value = tensor[..., :width]
        elif name.startswith("patch_embed.proj."):  # (D, 3, p, p) and (D,): the first W output channels
            value = tensor[:width]
        elif block:
            hidden = weights[f"blocks.{block.group(1)}.mlp.fc1.weight"].shape[0] * width // full_width
            value = _slice_block_tensor(block.group(2), tensor, width, hidden, scale)
        else:
            raise ValueError(f"the elastic ViT does not know how to cut the parameter '{name}'")
        sliced[f"blocks.{renumber[int(block.group(1))]}.{block.group(2)}" if block else name] = value
    return sliced


def subnet_timm_kwargs(kwargs: dict, width: int, depth: int, head_dim: int) -> dict:
    """timm.create_model arguments of the (width, depth) sub-network of a ViT built with `kwargs`."""
    return {**kwargs, "embed_dim": int(width), "depth": int(depth), "num_heads": int(width) // head_dim}


class ElasticViT:
    """Forward passes of any (width, depth) sub-network of `vit`, on its own (shared) parameters.

    Not an nn.Module on purpose: it owns no weights, so the method's state dict, optimizer and EMA teacher see
    the intact network only. `arch` and `timm_kwargs` are what `vit` was built with (timm.create_model)."""

    def __init__(self, vit: nn.Module, arch: str, timm_kwargs: dict):
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"the elastic student needs a timm VisionTransformer (a vit_* model.arch); "
                             f"{type(vit).__name__} is not one")
        if vit.attn_pool is not None:
            raise ValueError("the elastic student cannot cut attention pooling (global_pool=map): use token or avg")
        self.vit, self.arch, self.timm_kwargs = vit, arch, dict(timm_kwargs)
        self.full_width, self.full_depth = int(vit.embed_dim), len(vit.blocks)
        self.head_dim = int(vit.blocks[0].attn.head_dim)
        self.mlp_hidden = int(vit.blocks[0].mlp.fc1.out_features)
        slice_vit_weights({n: p.detach() for n, p in vit.named_parameters()}, self.full_width, self.full_depth)
        self._templates: dict[tuple[int, int], nn.Module] = {}

    def width_problem(self, width: int) -> str:
        """Why `width` cannot be a sub-network's width ('' if it can)."""
        if not 0 < width <= self.full_width:
            return f"a width must lie in 1..{self.full_width} (the intact network's)"
        if width % self.head_dim:
            return f"a width must be a multiple of the head dimension {self.head_dim} (whole attention heads)"
        if (self.mlp_hidden * width) % self.full_width:
            return f"{width} / {self.full_width} of the {self.mlp_hidden} MLP units is not a whole number"
        return ""

    def depth_problem(self, depth: int) -> str:
        return "" if 0 < depth <= self.full_depth else f"a depth must lie in 1..{self.full_depth} (the intact network's)"

    def template(self, width: int, depth: int) -> nn.Module:
        """A weightless (meta) timm ViT of the sub-network's size whose drop-path modules are the kept blocks'."""
        key = (width, depth)
        if key not in self._templates:
            problem = self.width_problem(width) or self.depth_problem(depth)
            if problem:
                raise ValueError(f"no sub-network of width {width} and depth {depth}: {problem}")
            with torch.device("meta"):
                model = timm.create_model(self.arch, pretrained=False,
                                          **subnet_timm_kwargs(self.timm_kwargs, width, depth, self.head_dim))
            for new, old in enumerate(kept_blocks(self.full_depth, depth)):  # the intact block's drop-path rate
                model.blocks[new].drop_path1 = self.vit.blocks[old].drop_path1
                model.blocks[new].drop_path2 = self.vit.blocks[old].drop_path2
            self._templates[key] = model
        return self._templates[key]

    def weights(self, width: int, depth: int) -> dict[str, torch.Tensor]:
        return slice_vit_weights(dict(self.vit.named_parameters()), width, depth)

    def __call__(self, images: torch.Tensor, width: int, depth: int) -> torch.Tensor:
        """Pooled features (B, width) of the sub-network, as the intact `vit(images)` gives (B, D)."""
        model = self.template(width, depth).train(self.vit.training)
        return torch.func.functional_call(model, self.weights(width, depth), (images,), strict=True)
