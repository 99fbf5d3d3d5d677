"""MAE's pixel reconstruction loss (He et al. 2022) and the patch layout it shares with the decoder's output.

A patch is flattened as (row within the patch, column within the patch, channel): channel fastest, the layout
MAE uses, so a predicted vector of P = patch * patch * 3 numbers reshapes to (patch, patch, 3). Patches are
row-major over the grid, the order of the ViT's patch tokens, so a token index is also a patch index here.

With `normalize` each target patch is standardised by its own mean and variance over its P pixel values (MAE's
norm_pix_loss): the decoder then predicts local contrast rather than absolute brightness, which MAE found gives
better representations. The loss is the squared error averaged over a patch's values, then over the predicted
patches; only the patches at `index` (the masked ones) count.
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/patch * W/patch, patch * patch * C), values ordered (row, column, channel)."""
    batch, channels, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    rows, cols = height // patch, width // patch
    x = images.reshape(batch, channels, rows, patch, cols, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, patch_row, patch_col, C)
    return x.reshape(batch, rows * cols, patch * patch * channels)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """(B, rows * cols, patch * patch * C) -> (B, C, rows * patch, cols * patch): the inverse of `patchify`."""
    rows, cols = grid
    if patches.shape[1:] != (rows * cols, patch * patch * channels):
        raise ValueError(f"patches {tuple(patches.shape)} do not fit a {rows}x{cols} grid of {patch}-pixel "
                         f"patches with {channels} channels")
    x = patches.reshape(patches.shape[0], rows, cols, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, rows, patch_row, cols, patch_col)
    return x.reshape(patches.shape[0], channels, rows * patch, cols * patch)


def masked_pixel_loss(predicted: torch.Tensor, images: torch.Tensor, patch: int, index: torch.Tensor,
                      normalize: bool = True) -> torch.Tensor:
    """predicted (B, M, P) for the patches at `index` (B, M) of `images` (B, C, H, W) -> scalar, fp32 or more."""
    targets = patchify(images, patch)  # (B, N, P)
    if index.dim() != 2 or predicted.shape[:2] != index.shape or predicted.shape[2] != targets.shape[2]:
        raise ValueError(f"predicted {tuple(predicted.shape)} does not match index {tuple(index.shape)} and "
                         f"{targets.shape[2]} values per patch")
    targets = targets.gather(1, index.long()[..., None].expand(-1, -1, targets.shape[2]))  # (B, M, P)
    dtype = torch.promote_types(torch.promote_types(predicted.dtype, targets.dtype), torch.float32)
    predicted, targets = predicted.to(dtype), targets.to(dtype)
    if normalize:
        mean = targets.mean(dim=-1, keepdim=True)
        variance = targets.var(dim=-1, keepdim=True)  # unbiased, as MAE's torch.var default
        targets = (targets - mean) / (variance + 1e-6) ** 0.5
    return (predicted - targets).square().mean(dim=-1).mean()
