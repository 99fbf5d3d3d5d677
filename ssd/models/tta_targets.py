"""Denoised dense targets by test-time augmentation: PH-Reg's teacher (Chen et al. 2025, "Vision Transformers with
Self-Distilled Registers"), after DVT's observation (Yang et al. 2024) that ViT artifacts stay at
fixed token positions while the image content moves with a shift.

Each image is seen in V views: view 0 the image itself, the others shifted by a few pixels and optionally
flipped. The teacher's patch tokens of every view are moved back onto the original patch grid (flip undone
exactly, shift undone by bilinear resampling of the token grid, which handles shifts of a fraction of a
patch) and averaged where the view covers the position. Content follows the image and survives the average;
position-locked artifacts land on different image positions in every view and are diluted. Resampling is
exact for whole-patch shifts and an approximation within a patch, a coarse one on very coarse grids (measured on
a 4 x 4 token grid: realigned cosine 0.997 for a whole-patch shift, 0.89 for half a patch; benchmarks/RESULTS.md).

    draw_views(generator, V, max_shift, p_flip)          -> shifts (V, 2) int (dy, dx) pixels, flips (V,) bool
    augment(images, shifts, flips)                       -> (B * V, C, H, W) views, image-major
    realign(features, shifts, flips, patch_size)         -> (B, D, h, w) sum over views, (B, 1, h, w) coverage
    average_views(tokens, shifts, flips, P, grid)       -> (B, N, D) from the views' tokens (B * V, N, D)
    denoised_targets(teacher, images, shifts, flips, P)  -> (B, N, D), the two steps with a teacher function

Conventions: a view moves the content by +shift (view pixel p shows image pixel p - shift), pixels that enter
from outside repeat the nearest border pixel, then the view is flipped left-right if asked. A constant fill
would draw an edge that the teacher encodes into the neighbouring, covered patches; repeating the border keeps
digits' and photos' borders as they are. Functions are pure: randomness is the caller's (per sample, seeded).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def draw_views(generator: np.random.Generator, num_views: int, max_shift: int,
               flip_probability: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """V views' shifts (V, 2) int64 (dy, dx), uniform in [-max_shift, max_shift], and flips (V,) bool; view 0 is
    the identity, so the un-augmented image always contributes (and covers every position)."""
    if num_views < 1 or max_shift < 0:
        raise ValueError(f"num_views must be >= 1 and max_shift >= 0, got {num_views} and {max_shift}")
    shifts = generator.integers(-max_shift, max_shift, size=(num_views, 2), endpoint=True).astype(np.int64)
    flips = generator.random(num_views) < flip_probability
    shifts[0], flips[0] = 0, False
    return shifts, flips


def augment(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W), shifts (B, V, 2) integer pixels, flips (B, V) bool -> views (B * V, C, H, W)."""
    batch, views = flips.shape
    _, channels, height, width = images.shape
    shifts = shifts.reshape(batch * views, 2).to(images.device).long()
    image_of_view = torch.arange(batch, device=images.device).repeat_interleave(views)  # (B * V,)
    # Source pixel of every view pixel, clamped into the image: the border repeats (integer shifts, exact).
    rows = (torch.arange(height, device=images.device) - shifts[:, :1]).clamp(0, height - 1)  # (B * V, H)
    columns = (torch.arange(width, device=images.device) - shifts[:, 1:]).clamp(0, width - 1)  # (B * V, W)
    flat = images.flatten(2)  # (B, C, H * W)
    source = (rows[:, :, None] * width + columns[:, None, :]).flatten(1)  # (B * V, H * W)
    shifted = flat[image_of_view].gather(2, source[:, None, :].expand(-1, channels, -1))
    shifted = shifted.view(batch * views, channels, height, width)
    flip = flips.reshape(-1).to(images.device)[:, None, None, None]
    return torch.where(flip, shifted.flip(-1), shifted)


def realign(features: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor,
            patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views' token grids (B * V, D, h, w) back on the original grid: (sum over views (B, D, h, w), coverage
    (B, 1, h, w)). Coverage counts the views that see a position (fractionally at a partly covered border).

    Flipping a view whose width is a whole number of patches maps patch columns onto patch columns: undone
    exactly. The original patch centred at pixel c sits at c + shift in the view, so each view's grid is
    sampled there, bilinearly (zeros outside the view: no contribution, and no coverage)."""
    batch, views = flips.shape
    dim, height, width = features.shape[1:]
    features = features.to(torch.promote_types(features.dtype, torch.float32))  # bf16 from autocast: fp32
    flip = flips.reshape(-1).to(features.device)[:, None, None, None]
    features = torch.where(flip, features.flip(-1), features)
    shifts = shifts.reshape(batch * views, 2).to(features.device, features.dtype) / patch_size  # in patches
    # grid_sample's coordinates (align_corners=False): -1 and 1 are the outer edges of the border patches.
    centre_rows = (torch.arange(height, device=features.device) + 0.5)[None, :] + shifts[:, :1]  # (B * V, h)
    centre_columns = (torch.arange(width, device=features.device) + 0.5)[None, :] + shifts[:, 1:]  # (B * V, w)
    grid = torch.stack(torch.broadcast_tensors(
        (2 * centre_columns / width - 1)[:, None, :], (2 * centre_rows / height - 1)[:, :, None]), dim=-1)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = features.new_ones(batch * views, 1, height, width)
    coverage = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled.view(batch, views, dim, height, width).sum(1),
            coverage.view(batch, views, 1, height, width).sum(1))


def average_views(tokens: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, patch_size: int,
                  grid: tuple[int, int]) -> torch.Tensor:
    """The views' patch tokens (B * V, N, D), image-major as `augment` gives them, realigned and averaged:
    (B, N, D), at least fp32, row-major over the `grid` (h, w)."""
    grids = tokens.transpose(1, 2).reshape(len(tokens), -1, *grid)  # (B * V, D, h, w)
    summed, coverage = realign(grids, shifts, flips, patch_size)
    return (summed / coverage).flatten(2).transpose(1, 2)  # (B, N, D); coverage >= 1 thanks to view 0


@torch.no_grad()
def denoised_targets(teacher: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, shifts: torch.Tensor,
                     flips: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`teacher`'s tokens of the views, averaged: (B, N, D). teacher: (B', C, H, W) -> (B', N, D) patch tokens
    (prefix tokens left out); H and W multiples of the patch size."""
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    return average_views(teacher(augment(images, shifts, flips)), shifts, flips, patch_size, grid)
