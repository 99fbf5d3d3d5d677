"""Block masks and the masking collator: exact counts, block shapes, uniform placement, seeding, DINOv2 batch rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssd.data import (
    DigitsDataset,
    MaskingCollator,
    MultiCropAugmentation,
    SeededCropsDataset,
    block_mask,
    collate_crops,
    masked_indices,
)

# --- block_mask -------------------------------------------------------------------------------------------


# (height, width, num_masked): empty, single patch, full grid, 1xN and Nx1 strips, counts below min_block.
COUNT_CASES = [(1, 1, 0), (1, 1, 1), (2, 2, 3), (3, 5, 15), (7, 3, 4), (20, 1, 13), (16, 16, 77)]
COUNT_CASES += [(14, 14, count) for count in (0, 1, 3, 19, 98, 195, 196)]
COUNT_CASES += [(1, 20, count) for count in (0, 1, 7, 20)]


@pytest.mark.parametrize("height, width, num_masked", COUNT_CASES)
def test_block_mask_masks_exactly_the_requested_count(height, width, num_masked):
    for seed in range(20):
        for min_block, max_block in ((4, None), (1, None), (16, None), (4, 6)):
            mask = block_mask(height, width, num_masked, np.random.default_rng(seed), min_block, max_block)
            assert mask.shape == (height, width) and mask.dtype == bool
            assert mask.sum() == num_masked, (seed, min_block, max_block)


def connected_components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of the True patches, each a list of (row, column)."""
    seen = np.zeros_like(mask)
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, component = [start], []
        while stack:
            row, column = stack.pop()
            component.append((row, column))
            for r, c in ((row + 1, column), (row - 1, column), (row, column + 1), (row, column - 1)):
                if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    stack.append((r, c))
        components.append(component)
    return components


def test_block_mask_is_made_of_rectangles():
    fills, sizes = [], []
    for seed in range(100):
        mask = block_mask(14, 14, 40, np.random.default_rng(seed))  # min_block 4, blocks up to the count
        for component in connected_components(mask):
            rows, columns = zip(*component)
            box_area = (max(rows) - min(rows) + 1) * (max(columns) - min(columns) + 1)
            fills.append(len(component) / box_area)
            sizes.append(len(component))
    # Overlapping blocks and the top-up make L-shapes now and then, so rectangles fill most of their box...
    assert np.mean(fills) >= 0.8
    # ...and are large: 40 patches scattered at random form ~2-patch components (which fill their box too).
    assert np.mean(sizes) >= 8


def test_block_mask_top_up_grows_blocks_instead_of_scattering():
    # Blocks of area 4 (3 to 4 patches after rounding), then 1-2 top-up patches: each lands next to a block,
    # so no component is smaller than the smallest block.
    for seed in range(100):
        mask = block_mask(14, 14, 10, np.random.default_rng(seed), min_block=4, max_block=4)
        assert min(len(component) for component in connected_components(mask)) >= 3, seed
    # Fewer patches than min_block: no block at all, the top-up grows one blob from a random patch.
    for seed in range(20):
        assert len(connected_components(block_mask(14, 14, 3, np.random.default_rng(seed), min_block=4))) == 1


@pytest.mark.parametrize("aspect, shape", [(1.0, (3, 3)), (4.0, (8, 2)), (0.25, (2, 8))])
def test_block_mask_aspect_is_height_over_width(aspect, shape):
    # One block holding the whole count: height = round(sqrt(area * aspect)), width = round(sqrt(area / aspect)).
    area = shape[0] * shape[1]
    for seed in range(10):
        mask = block_mask(20, 20, area, np.random.default_rng(seed), min_block=area, aspect_range=(aspect, aspect))
        rows, columns = np.nonzero(mask)
        top, left = rows.min(), columns.min()
        expected = np.zeros_like(mask)
        expected[top : top + shape[0], left : left + shape[1]] = True
        assert np.array_equal(mask, expected), seed


def test_first_block_aspect_stays_in_range():
    # area 12 drawn exactly (min_block = count); when the first block is a clean rectangle it is that block.
    low, high = 0.3, 1 / 0.3
    shapes = set()
    for seed in range(300):
        mask = block_mask(30, 30, 12, np.random.default_rng(seed), min_block=12, aspect_range=(low, high))
        rows, columns = np.nonzero(mask)
        height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
        if height * width == 12:
            shapes.add((int(height), int(width)))
    # Rounding widens the range a little: some aspect in [low, high] must round to (height, width).
    for height, width in shapes:
        assert (height - 0.5) / (width + 0.5) <= high and (height + 0.5) / (width - 0.5) >= low, (height, width)
    assert shapes == {(3, 4), (4, 3), (2, 6), (6, 2)}  # tall and wide both drawn; 1x12 is outside the range


def test_every_block_position_is_reachable_uniformly():
    # A single 2x2 block (area 4, aspect 1) on a 6x6 grid: the top-left corner is uniform over 5x5 positions,
    # so patch (r, c) is covered with probability coverage(r) * coverage(c) / 25, where coverage(i) counts the
    # corners t in 0..4 with t <= i <= t + 1 (1 at the borders, 2 inside).
    size, block, draws = 6, 2, 10_000
    coverage = np.array([sum(t <= i <= t + block - 1 for t in range(size - block + 1)) for i in range(size)])
    positions = (size - block + 1) ** 2
    expected = np.outer(coverage, coverage) / positions  # (6, 6)

    rng = np.random.default_rng(0)
    counts = np.zeros((size, size))
    corners = np.zeros((size - block + 1, size - block + 1))
    for _ in range(draws):
        mask = block_mask(size, size, 4, rng, min_block=4, aspect_range=(1.0, 1.0))
        counts += mask
        rows, columns = np.nonzero(mask)
        corners[rows.min(), columns.min()] += 1

    def max_relative_error(frequency):
        return (np.abs(frequency - expected) / expected).max()

    # Corners have the smallest expectation, 400 of 10000 (sd 20): 0.2 is a 4-sigma bound on each patch.
    assert max_relative_error(counts / draws) < 0.2
    # Chi-square of the 25 corner positions against uniform: 51.2 is the 99.9% quantile for 24 degrees of freedom.
    expected_corner = draws / positions
    assert ((corners - expected_corner) ** 2 / expected_corner).sum() < 51.2
    # The bound catches an off-by-one that never puts a block on the last row (corner rows 0..3 only).
    wrong_coverage = np.array([sum(t <= i <= t + 1 for t in range(size - block)) for i in range(size)])
    wrong = np.outer(wrong_coverage, coverage) / ((size - block) * (size - block + 1))
    assert max_relative_error(wrong) > 0.2


def test_block_mask_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"num_masked must be in \[0, height\*width=12\].*got 13"):
        block_mask(3, 4, 13, rng)
    with pytest.raises(ValueError, match="got -1"):
        block_mask(3, 4, -1, rng)
    with pytest.raises(ValueError, match="height=0, width=4"):
        block_mask(0, 4, 0, rng)
    with pytest.raises(ValueError, match="min_block must be >= 1"):
        block_mask(3, 4, 2, rng, min_block=0)
    with pytest.raises(ValueError, match="max_block must be None or >= min_block=4, got 2"):
        block_mask(3, 4, 2, rng, max_block=2)
    with pytest.raises(ValueError, match="aspect_range"):
        block_mask(3, 4, 2, rng, aspect_range=(2.0, 1.0))


# --- MaskingCollator --------------------------------------------------------------------------------------

GRID = (6, 8)
NUM_PATCHES = 48


def make_samples(indices, epoch=0, global_crops=2, local_crops=3):
    """Per-sample dicts shaped like SeededCropsDataset's, crops filled with values that identify them."""
    samples = []
    for index in indices:
        generator = torch.Generator().manual_seed(index)
        crops = [torch.rand(3, 8, 8, generator=generator) for _ in range(global_crops)]
        crops += [torch.rand(3, 4, 4, generator=generator) for _ in range(local_crops)]
        samples.append({"crops": crops, "label": index % 10, "index": index, "epoch": epoch})
    return samples


def test_collator_output_matches_collate_crops_plus_masks():
    samples = make_samples([4, 9, 1, 30, 2])
    batch = MaskingCollator(GRID, seed=3)(samples)
    reference = collate_crops(samples)
    assert set(batch) == {"crops", "labels", "indices", "masks"}
    assert len(batch["crops"]) == len(reference["crops"]) == 5  # local crops pass through, unmasked
    for crops, expected in zip(batch["crops"], reference["crops"]):
        assert torch.equal(crops, expected)
    assert torch.equal(batch["labels"], reference["labels"]) and torch.equal(batch["indices"], reference["indices"])
    assert batch["masks"].shape == (2, 5, NUM_PATCHES) and batch["masks"].dtype == torch.bool
    # An int grid is square.
    assert MaskingCollator(7)(samples)["masks"].shape == (2, 5, 49)


@pytest.mark.parametrize("batch_size, probability", [(5, 0.5), (5, 0.3), (8, 1.0), (8, 0.0), (3, 0.75), (16, 0.5)])
def test_collator_masks_round_n_probability_pairs_with_spread_ratios(batch_size, probability):
    ratio_min, ratio_max = 0.1, 0.5
    collator = MaskingCollator(GRID, ratio_range=(ratio_min, ratio_max), probability=probability, seed=1)
    for start in range(5):
        masks = collator(make_samples(range(start, start + batch_size)))["masks"]
        counts = masks.sum(dim=-1).flatten()  # (V*B,)
        masked_counts = counts[counts > 0].sort().values.tolist()
        expected_pairs = round(2 * batch_size * probability)
        assert len(masked_counts) == expected_pairs  # ratio_min * 48 >= 4 patches, so a masked pair shows
        # The k-th smallest ratio lies in the k-th of `expected_pairs` equal sub-intervals of [min, max].
        edges = np.linspace(ratio_min, ratio_max, expected_pairs + 1)
        for k, count in enumerate(masked_counts):
            assert int(NUM_PATCHES * edges[k]) <= count <= int(NUM_PATCHES * edges[k + 1]), (k, count, edges)


def test_collator_is_deterministic_given_seed_epoch_and_indices():
    collator = MaskingCollator(GRID, seed=5)
    masks = collator(make_samples([3, 1, 4, 1, 5, 9], epoch=2))["masks"]
    assert torch.equal(masks, MaskingCollator(GRID, seed=5)(make_samples([3, 1, 4, 1, 5, 9], epoch=2))["masks"])
    assert not torch.equal(masks, collator(make_samples([3, 1, 4, 1, 5, 9], epoch=3))["masks"])
    assert not torch.equal(masks, MaskingCollator(GRID, seed=6)(make_samples([3, 1, 4, 1, 5, 9], epoch=2))["masks"])
    # Without an "epoch" key the collator reads epoch 0.
    samples = make_samples([3, 1, 4], epoch=0)
    for sample in samples:
        del sample["epoch"]
    assert torch.equal(collator(samples)["masks"], collator(make_samples([3, 1, 4], epoch=0))["masks"])


def test_block_placement_depends_only_on_the_sample_and_view():
    # One ratio for every pair, every pair masked: what remains is block placement, seeded per (sample, view).
    collator = MaskingCollator(GRID, ratio_range=(0.3, 0.3), probability=1.0, seed=2)
    alone = collator(make_samples([7], epoch=4))["masks"][:, 0]  # (V, N)
    first = collator(make_samples([7, 1, 2], epoch=4))["masks"][:, 0]
    last = collator(make_samples([5, 11, 7], epoch=4))["masks"][:, 2]
    assert torch.equal(alone, first) and torch.equal(alone, last)
    assert alone.sum(dim=-1).tolist() == [int(NUM_PATCHES * 0.3)] * 2
    assert not torch.equal(alone[0], alone[1])  # the two global crops get their own blocks


def test_collator_with_real_crops_in_a_data_loader():
    digits = DigitsDataset("test", image_size=16)
    samples = SeededCropsDataset(digits, MultiCropAugmentation(global_size=16, local_number=2, local_size=8), seed=2)
    keys = [(0, index) for index in range(8)]
    loader = DataLoader(samples, batch_size=4, sampler=keys, collate_fn=MaskingCollator(4, seed=2))
    for batch in loader:
        assert [tuple(crops.shape) for crops in batch["crops"]] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
        assert batch["masks"].shape == (2, 4, 16)
        assert batch["masks"].any(dim=-1).sum() == 4


def test_masked_indices_gather_the_masked_tokens():
    masks = MaskingCollator(GRID, probability=0.75, seed=0)(make_samples([0, 1, 2, 3]))["masks"]  # (2, 4, 48)
    rows, columns = masked_indices(masks)
    tokens = torch.arange(8 * NUM_PATCHES).reshape(8, NUM_PATCHES, 1).float()  # (V*B, N, D=1): token id
    gathered = tokens[rows, columns]  # (M, 1)
    assert gathered.shape == (int(masks.sum()), 1)
    assert torch.equal(gathered[:, 0].long(), torch.nonzero(masks.flatten()).flatten())
    assert torch.equal(rows // 4, torch.nonzero(masks, as_tuple=True)[0])  # rows run view by view


def test_collator_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"ratio_range must be .*got \(0.5, 0.2\)"):
        MaskingCollator(GRID, ratio_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="max < 1"):
        MaskingCollator(GRID, ratio_range=(0.1, 1.0))
    with pytest.raises(ValueError, match="0 <= min"):
        MaskingCollator(GRID, ratio_range=(-0.1, 0.5))
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\], got 1.5"):
        MaskingCollator(GRID, probability=1.5)
    with pytest.raises(ValueError, match="grid must be positive"):
        MaskingCollator((0, 4))
    with pytest.raises(ValueError, match="num_masked_views must be >= 1"):
        MaskingCollator(GRID, num_masked_views=0)
    with pytest.raises(ValueError, match="min_block"):
        MaskingCollator(GRID, min_block=0)
    with pytest.raises(ValueError, match="samples have 2 crops but num_masked_views=3"):
        MaskingCollator(GRID, num_masked_views=3)(make_samples([0, 1], local_crops=0))


def test_collator_masks_only_the_first_num_masked_views_crops():
    samples = make_samples([0, 1, 2], global_crops=1, local_crops=4)
    batch = MaskingCollator(GRID, num_masked_views=1, probability=1.0)(samples)
    assert batch["masks"].shape == (1, 3, NUM_PATCHES) and batch["masks"].any(dim=-1).all()
    assert len(batch["crops"]) == 5
