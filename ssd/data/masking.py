"""Masks for masked image modelling (iBOT, DINOv2): block-wise masks over the ViT patch grid, chosen per batch.

`block_mask` places BEiT/iBOT-style rectangles until exactly `num_masked` patches are masked. `MaskingCollator`
replaces `collate_crops` as the DataLoader `collate_fn` and adds one mask per (global crop, image):

    loader = DataLoader(samples, batch_size, sampler=sampler, collate_fn=MaskingCollator(grid=14, seed=seed))
    batch["masks"]                                  # (num_masked_views, B, H*W) bool, True = masked
    rows, columns = masked_indices(batch["masks"])  # gather the masked patch tokens for the patch head

Masks depend only on (seed, epoch, the batch's sample indices), never on DataLoader worker state, so a resumed
run that sees the same batches masks the same patches (see ssd/data/seeded.py for the same rule on crops).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ssd.data.seeded import collate_crops, mix_seeds

# A block gets this many tries to land somewhere useful before block placement stops (BEiT uses 10 too).
ATTEMPTS_PER_BLOCK = 10

# SeedSequence ignores trailing zeros ([s, e, 5, 0] seeds like [s, e, 5]), so the batch-level and the
# per-sample seeds start with different tags, and the batch seed counts its indices, to never coincide.
_BATCH_SEED_TAG = 0x6D61736B  # "mask"
_SAMPLE_SEED_TAG = 0x626C6B73  # "blks"
_PAIR_SEED_TAG = 0x70616972  # "pair"


def block_mask(
    height: int,
    width: int,
    num_masked: int,
    generator: np.random.Generator,
    min_block: int = 4,
    max_block: int | None = None,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """A (height, width) bool mask with exactly `num_masked` True patches, made of rectangular blocks.

    Each block: area uniform in [min_block, min(max_block or num_masked, patches still to mask)], aspect
    ratio (height / width) log-uniform in `aspect_range`, top-left corner uniform over every position where
    the block fits. A block that would add no new patch or overshoot the count is redrawn; after
    ATTEMPTS_PER_BLOCK misses (or when fewer than `min_block` patches remain) the count is topped up one
    patch at a time, preferring unmasked patches next to masked ones so the mask stays blob-shaped.
    """
    if height < 1 or width < 1:
        raise ValueError(f"mask grid must be at least 1x1, got height={height}, width={width}")
    if not 0 <= num_masked <= height * width:
        raise ValueError(
            f"num_masked must be in [0, height*width={height * width}] for a {height}x{width} grid, got {num_masked}"
        )
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    if max_block is not None and max_block < min_block:
        raise ValueError(f"max_block must be None or >= min_block={min_block}, got {max_block}")
    aspect_min, aspect_max = aspect_range
    if not 0 < aspect_min <= aspect_max:
        raise ValueError(f"aspect_range must be (low, high) with 0 < low <= high, got {aspect_range}")

    mask = np.zeros((height, width), dtype=bool)
    remaining = num_masked
    largest_block = num_masked if max_block is None else max_block
    log_aspect_range = (math.log(aspect_min), math.log(aspect_max))

    while remaining >= min_block:
        added = _place_block(mask, remaining, min(largest_block, remaining), min_block, log_aspect_range, generator)
        if added == 0:
            break  # the grid is too crowded for blocks that fit the remaining count
        remaining -= added

    _top_up(mask, remaining, generator)
    return mask


def _place_block(mask, remaining, max_area, min_block, log_aspect_range, generator) -> int:
    """Try to mask one random rectangle in place; return how many new patches it masked (0 = gave up)."""
    height, width = mask.shape
    for _ in range(ATTEMPTS_PER_BLOCK):
        area = int(generator.integers(min_block, max_area + 1))
        aspect = math.exp(generator.uniform(*log_aspect_range))  # height / width
        block_height = min(max(round(math.sqrt(area * aspect)), 1), height)
        block_width = min(max(round(math.sqrt(area / aspect)), 1), width)
        # integers' upper bound is exclusive: +1 makes the last row/column reachable.
        top = int(generator.integers(0, height - block_height + 1))
        left = int(generator.integers(0, width - block_width + 1))
        window = mask[top : top + block_height, left : left + block_width]  # a view: writes go to `mask`
        added = int(window.size - window.sum())
        if 0 < added <= remaining:
            window[:] = True
            return added
    return 0


def _top_up(mask: np.ndarray, count: int, generator: np.random.Generator) -> None:
    """Mask `count` more patches in place, each uniform among unmasked 4-neighbours of masked patches (or
    among all unmasked patches when there are none), so the top-up grows the blocks instead of salting."""
    for _ in range(count):
        touching = np.zeros_like(mask)
        touching[1:, :] |= mask[:-1, :]
        touching[:-1, :] |= mask[1:, :]
        touching[:, 1:] |= mask[:, :-1]
        touching[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(touching & ~mask)
        if candidates.size == 0:
            candidates = np.flatnonzero(~mask)
        mask.flat[generator.choice(candidates)] = True


def masked_indices(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (rows, columns) of the masked tokens, for running the patch head on masked tokens only.

    masks (V, B, N) is read as (V*B, N), the layout of the global crops' patch tokens stacked view by view:
    `patch_tokens[rows, columns]` with patch_tokens (V*B, N, D) gives the masked tokens (M, D), M = masks.sum().
    """
    return torch.nonzero(masks.reshape(-1, masks.shape[-1]), as_tuple=True)


class MaskingCollator:
    """`collate_fn` that returns `collate_crops(samples)` plus "masks" (num_masked_views, B, H*W) bool.

    One mask per global crop (the first `num_masked_views` crops) and image; local crops are never masked.
    As in DINOv2, of the n = num_masked_views * B (view, image) pairs, round(n * probability) are masked
    (Python's round), with ratios spread over the batch: [ratio_min, ratio_max] is cut into that many equal
    sub-intervals, one ratio is drawn in each and the ratios are dealt to the chosen pairs in random order;
    a pair with ratio r masks int(H*W*r) patches. Which pairs and which ratios come from the batch
    (seed, epoch, indices); where the blocks go comes from (seed, epoch, sample index, view) alone.

    With `spread_in_batch=False` every (view, image) pair decides alone, from (seed, epoch, sample index,
    view): masked with `probability`, ratio uniform in the range (iBOT's per-image rule). Then masks do not
    depend on how samples are grouped into batches, so runs on 1 or N processes (whose per-process batches
    differ) and resumes at another process count mask the same patches; DINOv2's spread is per process anyway.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        ratio_range: tuple[float, float] = (0.1, 0.5),
        probability: float = 0.5,
        num_masked_views: int = 2,
        seed: int = 0,
        min_block: int = 4,
        aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
        spread_in_batch: bool = True,
    ):
        height, width = (grid, grid) if isinstance(grid, int) else grid
        if height < 1 or width < 1:
            raise ValueError(f"grid must be positive (patches per side), got {grid}")
        ratio_min, ratio_max = ratio_range
        if not 0 <= ratio_min <= ratio_max < 1:
            raise ValueError(f"ratio_range must be (min, max) with 0 <= min <= max < 1, got {ratio_range}")
        if not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if num_masked_views < 1:
            raise ValueError(f"num_masked_views must be >= 1, got {num_masked_views}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        # Fail here rather than in the first DataLoader worker.
        block_mask(height, width, 0, np.random.default_rng(0), min_block=min_block, aspect_range=aspect_range)
        self.grid = (height, width)
        self.ratio_range = (float(ratio_min), float(ratio_max))
        self.probability = probability
        self.num_masked_views = num_masked_views
        self.seed = seed
        self.min_block = min_block
        self.aspect_range = aspect_range
        self.spread_in_batch = spread_in_batch

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate_crops(samples)
        if len(batch["crops"]) < self.num_masked_views:
            raise ValueError(
                f"samples have {len(batch['crops'])} crops but num_masked_views={self.num_masked_views}: "
                "lower num_masked_views to the number of global crops"
            )
        height, width = self.grid
        batch_size = len(samples)
        epochs = [int(sample.get("epoch", 0)) for sample in samples]
        indices = [int(sample["index"]) for sample in samples]

        if self.spread_in_batch:
            chosen_pairs, ratios = self._spread_over_batch(epochs[0], indices)
        else:
            chosen_pairs, ratios = self._per_pair(epochs, indices)

        masks = torch.zeros((self.num_masked_views, batch_size, height * width), dtype=torch.bool)
        for pair, ratio in zip(chosen_pairs, ratios):
            view, image = divmod(pair, batch_size)  # pairs are laid out (V, B), like the masks
            # Block placement ignores the rest of the batch: same sample, view and count -> same mask.
            sample_rng = np.random.default_rng(
                mix_seeds(_SAMPLE_SEED_TAG, self.seed, epochs[image], indices[image], view)
            )
            count = int(height * width * ratio)
            mask = block_mask(height, width, count, sample_rng, self.min_block, aspect_range=self.aspect_range)
            masks[view, image] = torch.from_numpy(mask.reshape(-1))  # (H, W) -> (N,), row-major like the patches
        return {**batch, "masks": masks}

    def _spread_over_batch(self, epoch: int, indices: list[int]) -> tuple[list[int], list[float]]:
        """Which (view, image) pairs get a mask and with which ratio: one draw per batch (a batch comes from
        one epoch of the sampler, so the first sample's epoch is the batch's)."""
        batch_rng = np.random.default_rng(
            np.random.SeedSequence([_BATCH_SEED_TAG, self.seed, epoch, len(indices), *indices])
        )
        num_pairs = self.num_masked_views * len(indices)
        num_masked_pairs = round(num_pairs * self.probability)
        chosen_pairs = np.sort(batch_rng.choice(num_pairs, size=num_masked_pairs, replace=False))
        edges = np.linspace(*self.ratio_range, num_masked_pairs + 1)  # one sub-interval per masked pair
        ratios = batch_rng.uniform(edges[:-1], edges[1:])[batch_rng.permutation(num_masked_pairs)]
        return chosen_pairs.tolist(), ratios.tolist()

    def _per_pair(self, epochs: list[int], indices: list[int]) -> tuple[list[int], list[float]]:
        chosen_pairs, ratios = [], []
        for view in range(self.num_masked_views):
            for image, (epoch, index) in enumerate(zip(epochs, indices)):
                rng = np.random.default_rng(mix_seeds(_PAIR_SEED_TAG, self.seed, epoch, index, view))
                masked, ratio = rng.random() < self.probability, rng.uniform(*self.ratio_range)
                if masked:
                    chosen_pairs.append(view * len(indices) + image)
                    ratios.append(ratio)
        return chosen_pairs, ratios
