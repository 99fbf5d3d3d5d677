"""I-JEPA multi-block masks: per image, one large context block and several small target blocks on the patch grid.

`MultiBlockCollator` replaces `collate_crops` as the DataLoader `collate_fn`:

    loader = DataLoader(samples, batch_size, sampler=sampler, collate_fn=MultiBlockCollator(grid=14, seed=seed))
    batch["context"]  # (B, K) long: patches (row-major over the grid) the context encoder sees, ascending
    batch["targets"]  # (B, T, M) long: patches of each of the T target blocks, row-major inside the block

The target block size (h, w) is drawn once per batch, so every image has T blocks of M = h * w patches; each
block's top-left corner is uniform over every position where it fits, the last row and column included. The
context is a block of a per-batch size at a per-image position, minus the image's target blocks.

The context counts differ between images (targets overlap the context block by varying amounts). I-JEPA's own
collator makes them equal by keeping the first K indices of each context, K = the batch minimum; as indices are
row-major, that always drops the bottom/right patches of the larger contexts. Here each image keeps a uniformly
random subset of K of its context patches instead (then sorted): every context patch is equally likely to stay,
and a fixed K still lets the encoder run the batch as one (B, K) tensor without attention masks.

Everything depends only on (seed, epoch, the batch's sample indices), never on DataLoader worker state or global
RNGs: block positions on (seed, epoch, sample index, block), the per-batch sizes and the subsets on (seed, epoch,
all the batch's indices). See ssd/data/masking.py for the same rule on iBOT masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ssd.data.seeded import collate_crops, mix_seeds

# Target placements an image gets to leave at least `min_context` context patches before the collator gives up.
MAX_TRIES = 20

# One tag per use, so that no two seeds coincide (SeedSequence ignores trailing zeros; the batch seeds count
# their indices as in masking.py).
_SIZES_SEED_TAG = 0x73697A65  # "size"
_SUBSET_SEED_TAG = 0x6B656570  # "keep"
_TARGET_SEED_TAG = 0x74677473  # "tgts"
_CONTEXT_SEED_TAG = 0x63747874  # "ctxt"


def _check_range(name: str, value: tuple[float, float], upper: float | None) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if upper is None and not 0 < low <= high:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, e.g. (0.75, 1.5), got {value}")
    if upper is not None and not 0 < low <= high <= upper:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= {upper}, e.g. (0.15, 0.2), got {value}")
    return low, high


def _block_size(grid, scale, aspect, generator: np.random.Generator) -> tuple[int, int]:
    """(h, w) with h * w ~ scale * grid area, h / w ~ aspect (both uniform), clipped to [1, grid side]."""
    height, width = grid
    area = generator.uniform(*scale) * height * width
    ratio = generator.uniform(*aspect)
    block_height = min(max(round(math.sqrt(area * ratio)), 1), height)
    block_width = min(max(round(math.sqrt(area / ratio)), 1), width)
    return block_height, block_width


def _place(grid, size, generator: np.random.Generator) -> np.ndarray:
    """Flat row-major indices (h*w,) of a block of `size` with its top-left corner uniform over every fit."""
    (height, width), (block_height, block_width) = grid, size
    # integers' upper bound is exclusive: +1 makes the last row/column reachable.
    top = int(generator.integers(0, height - block_height + 1))
    left = int(generator.integers(0, width - block_width + 1))
    rows = np.arange(top, top + block_height)[:, None]
    columns = np.arange(left, left + block_width)[None, :]
    return (rows * width + columns).reshape(-1)


class MultiBlockCollator:
    """`collate_fn` that returns `collate_crops(samples)` plus "context" (B, K) and "targets" (B, T, M), long.

    grid: patches per side (H, W) or one int for a square grid. num_targets = T blocks per image, of a per-batch
    size: scale (fraction of H*W) uniform in `target_scale`, aspect h/w uniform in `target_aspect`; likewise the
    context block with `context_scale` / `context_aspect`. An image whose context keeps fewer than `min_context`
    patches after removing its targets redraws its target positions (up to MAX_TRIES times, then RuntimeError).
    Defaults are the I-JEPA paper's.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        seed: int = 0,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        context_aspect: tuple[float, float] = (1.0, 1.0),
        min_context: int = 10,
    ):
        height, width = (grid, grid) if isinstance(grid, int) else grid
        if height < 1 or width < 1:
            raise ValueError(f"grid must be positive (patches per side, e.g. 14 or (14, 14)), got {grid}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if num_targets < 1:
            raise ValueError(f"num_targets must be >= 1 (I-JEPA uses 4), got {num_targets}")
        if not 1 <= min_context <= height * width:
            raise ValueError(
                f"min_context must be in [1, H*W={height * width}] for a {height}x{width} grid, got {min_context}"
            )
        self.grid = (height, width)
        self.seed = seed
        self.num_targets = num_targets
        self.target_scale = _check_range("target_scale", target_scale, upper=1.0)
        self.target_aspect = _check_range("target_aspect", target_aspect, upper=None)
        self.context_scale = _check_range("context_scale", context_scale, upper=1.0)
        self.context_aspect = _check_range("context_aspect", context_aspect, upper=None)
        self.min_context = min_context

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate_crops(samples)
        epochs = [int(sample.get("epoch", 0)) for sample in samples]
        indices = [int(sample["index"]) for sample in samples]
        # A batch comes from one epoch of the sampler, so the first sample's epoch is the batch's.
        batch_key = [self.seed, epochs[0], len(indices), *indices]

        sizes_rng = np.random.default_rng(np.random.SeedSequence([_SIZES_SEED_TAG, *batch_key]))
        target_size = _block_size(self.grid, self.target_scale, self.target_aspect, sizes_rng)
        context_size = _block_size(self.grid, self.context_scale, self.context_aspect, sizes_rng)

        contexts, targets = [], []  # B arrays (n_b,) of varying n_b; B arrays (T, M)
        for epoch, index in zip(epochs, indices):
            context, blocks = self._sample_image(epoch, index, target_size, context_size)
            contexts.append(context)
            targets.append(blocks)

        subset_rng = np.random.default_rng(np.random.SeedSequence([_SUBSET_SEED_TAG, *batch_key]))
        keep = min(len(context) for context in contexts)  # K >= min_context
        kept = np.stack([np.sort(subset_rng.choice(context, size=keep, replace=False)) for context in contexts])
        return {
            **batch,
            "context": torch.from_numpy(kept).long(),  # (B, K)
            "targets": torch.from_numpy(np.stack(targets)).long(),  # (B, T, M)
        }

    def _sample_image(self, epoch: int, index: int, target_size, context_size) -> tuple[np.ndarray, np.ndarray]:
        """One image's context indices (n,) ascending, n >= min_context, and target blocks (T, M).

        Block t's positions come from its own generator, seeded by (seed, epoch, index, t): a redraw takes the
        next positions from the same generators, so nothing depends on the other samples of the batch except
        the per-batch sizes.
        """
        height, width = self.grid
        context_rng = np.random.default_rng(mix_seeds(_CONTEXT_SEED_TAG, self.seed, epoch, index))
        in_context = np.zeros(height * width, dtype=bool)  # (H*W,)
        in_context[_place(self.grid, context_size, context_rng)] = True
        target_rngs = [
            np.random.default_rng(mix_seeds(_TARGET_SEED_TAG, self.seed, epoch, index, target))
            for target in range(self.num_targets)
        ]
        for _ in range(MAX_TRIES):
            blocks = np.stack([_place(self.grid, target_size, rng) for rng in target_rngs])  # (T, M)
            remaining = in_context.copy()
            remaining[blocks.reshape(-1)] = False
            context = np.flatnonzero(remaining)
            if len(context) >= self.min_context:
                return context, blocks
        raise RuntimeError(
            f"after {MAX_TRIES} target placements, the context of sample {index} keeps fewer than "
            f"min_context={self.min_context} patches (context block {context_size}, {self.num_targets} targets of "
            f"{target_size} on a {height}x{width} grid): lower min_context, num_targets or target_scale, or raise "
            "context_scale"
        )
