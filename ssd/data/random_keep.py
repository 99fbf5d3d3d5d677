"""Random patch keeping for masked distillation (MaskedKD / DMAE): each image keeps the same number of patches,
chosen uniformly at random, seeded by (seed, epoch, sample index) so a resumed run keeps the same patches.

    collate = RandomKeepCollator(num_patches=196, mask_ratio=0.75, seed=0)
    batch = collate(samples)   # collate_crops(samples) + {"keep": (B, K) long, sorted row-major patch indices}

Equal counts per image (K = round((1 - mask_ratio) * N), at least 1) let the kept tokens form one (B, K, D) batch
with no padding and no truncation bias; sorted indices keep each image's tokens in raster order.
"""

from __future__ import annotations

import numpy as np
import torch

from ssd.data.seeded import collate_crops, mix_seeds

_KEEP_SEED_TAG = 0x726B6570  # "rkep": no other user of (seed, epoch, index) draws the same numbers


class RandomKeepCollator:
    def __init__(self, num_patches: int, mask_ratio: float, seed: int = 0):
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        if num_patches < 1 or seed < 0:
            raise ValueError(f"num_patches must be positive and seed non-negative, got {num_patches}, {seed}")
        self.num_patches = num_patches
        self.keep_count = max(1, round((1.0 - mask_ratio) * num_patches))
        self.seed = seed

    def kept_patches(self, epoch: int, index: int) -> np.ndarray:
        generator = np.random.default_rng(mix_seeds(_KEEP_SEED_TAG, self.seed, epoch, index))
        return np.sort(generator.permutation(self.num_patches)[: self.keep_count])

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate_crops(samples)
        kept = [self.kept_patches(int(sample.get("epoch", 0)), int(sample["index"])) for sample in samples]
        return {**batch, "keep": torch.from_numpy(np.stack(kept)).long()}  # (B, K)
