"""Visual checks of a ViT backbone: what DINO and DINOv2 show in their papers.

- the last block's attention from the CLS token to every patch, one map per head (DINO, Fig. 1);
- a 3-component PCA of the patch features shown as RGB, fitted over all images together (DINOv2, Fig. 1).

    python -m ssd.visualize checkpoints/my_run img1.jpg img2.jpg --out visuals/ --size 224

writes ``attention.png`` (a row per image: the image, then one map per head) and ``pca.png`` (image | PCA).
``log_to_tensorboard(writer, backbone, images, step)`` logs the same two grids from a training loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torchvision.utils import make_grid, save_image

from ssd.cli import run_command


def _check_vit(backbone) -> VisionTransformer:
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(f"visual checks need a timm VisionTransformer backbone, not {type(backbone).__name__}")
    return backbone


def _patch_grid(backbone: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    patch_h, patch_w = backbone.patch_embed.patch_size
    return images.shape[-2] // patch_h, images.shape[-1] // patch_w


@torch.no_grad()
def cls_attention(backbone, images: torch.Tensor) -> torch.Tensor:
    """Last block's CLS-to-patch attention, (B, heads, h, w); registers are left out, each map sums to <= 1."""
    backbone = _check_vit(backbone)
    attention = backbone.blocks[-1].attn
    captured = {}
    # timm computes attention with a fused kernel that never materialises the weights, so the block's input is
    # captured and the softmax(q k^T) recomputed from the same projections.
    handle = attention.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    try:
        backbone.eval()(images)
    finally:
        handle.remove()
    tokens = captured["x"]  # (B, N, D), N = prefix tokens + patches
    batch, num_tokens, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(batch, num_tokens, 3, attention.num_heads, attention.head_dim)
    q, k = attention.q_norm(qkv[:, :, 0].transpose(1, 2)), attention.k_norm(qkv[:, :, 1].transpose(1, 2))
    weights = ((q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
    h, w = _patch_grid(backbone, images)
    return weights[:, :, 0, backbone.num_prefix_tokens:].reshape(batch, attention.num_heads, h, w)


@torch.no_grad()
def pca_rgb(backbone, images: torch.Tensor) -> torch.Tensor:
    """Patch features projected on their 3 first principal components (fitted on all images at once, so
    colours are comparable across images), each scaled to [0, 1]: (B, 3, h, w)."""
    backbone = _check_vit(backbone)
    tokens = backbone.eval().forward_features(images)[:, backbone.num_prefix_tokens:]  # (B, h*w, D)
    batch, num_patches, dim = tokens.shape
    flat = tokens.reshape(-1, dim).float()
    flat = flat - flat.mean(dim=0)
    _, _, components = torch.linalg.svd(flat, full_matrices=False)  # rows of components: principal axes
    projected = flat @ components[:3].T  # (B*h*w, 3)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    projected = (projected - low) / (high - low).clamp_min(1e-8)
    h, w = _patch_grid(backbone, images)
    return projected.reshape(batch, h, w, 3).permute(0, 3, 1, 2)


def displayable(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Normalised model inputs back to [0, 1] (with mean/std), or min-max scaled per image without them."""
    if mean is not None and std is not None:
        images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        return images.clamp(0, 1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8)


def _upsample(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="nearest")  # nearest: one visible square per patch


def attention_grid(backbone, images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """(3, H', W') image grid: a row per image, the image then each head's map (scaled to [0, 1] per map)."""
    maps = cls_attention(backbone, images).float()  # (B, heads, h, w)
    low = maps.amin(dim=(2, 3), keepdim=True)
    maps = (maps - low) / (maps.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-12)
    maps = _upsample(maps, images.shape[-2:]).unsqueeze(2).expand(-1, -1, 3, -1, -1)  # (B, heads, 3, H, W)
    rows = torch.cat([displayable(images.float(), mean, std).unsqueeze(1), maps], dim=1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=rows.shape[1], padding=2, pad_value=1.0)


def pca_grid(backbone, images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """(3, H', W') image grid: a row per image, the image then its patch-feature PCA as RGB."""
    colours = _upsample(pca_rgb(backbone, images), images.shape[-2:])
    rows = torch.stack([displayable(images.float(), mean, std), colours], dim=1)  # (B, 2, 3, H, W)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=2, padding=2, pad_value=1.0)


def log_to_tensorboard(writer, backbone, images: torch.Tensor, step: int, mean=None, std=None,
                       tag: str = "visual") -> None:
    """Log the attention and PCA grids of ``images`` (normalised model inputs, (B, 3, H, W)) at ``step``.

    The backbone is put in eval mode for the pass and given back in the mode it was in.
    """
    was_training = backbone.training
    try:
        device = next(backbone.parameters()).device
        images = images.to(device)
        writer.add_image(f"{tag}/cls_attention", attention_grid(backbone, images, mean, std), step)
        writer.add_image(f"{tag}/patch_pca", pca_grid(backbone, images, mean, std), step)
    finally:
        backbone.train(was_training)


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m ssd.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="run folder, ssd checkpoint, ssd export, or official weights (+ --arch)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", default="visuals", help="output folder for attention.png and pca.png")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--size", type=int, default=None,
                        help="images are resized and centre-cropped to this (default: the weights' eval crop, else 224)")
    parser.add_argument("--arch", default=None, help="timm architecture, for official weights only")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=0)
    args = parser.parse_args(argv)

    from ssd.checkpoint_import import load_backbone_for_eval
    from ssd.data import eval_transform, load_rgb

    official = {"arch": args.arch, "img_size": args.img_size, "patch_size": args.patch_size} if args.arch else None
    backbone, info = load_backbone_for_eval(args.weights, args.which, official)
    args.size = args.size or info.get("crop") or 224
    transform = eval_transform(args.size, args.size, info["mean"], info["std"])
    images = torch.stack([transform(load_rgb(path)) for path in args.images])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "attention.png", out / "pca.png"]
    save_image(attention_grid(backbone, images, info["mean"], info["std"]), written[0])
    save_image(pca_grid(backbone, images, info["mean"], info["std"]), written[1])
    print("wrote " + ", ".join(str(path) for path in written))
    return written


def cli() -> int:
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
