"""I-JEPA multi-block collator: uniform block placement, unbiased context subsets, shapes, seeding, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from ssd.data.multiblock import MultiBlockCollator
from ssd.data.seeded import collate_crops


def fake_samples(indices, epoch: int = 0) -> list[dict]:
    return [{"crops": [torch.zeros(3, 4, 4)], "label": 0, "index": int(i), "epoch": epoch} for i in indices]


def rectangle(block: np.ndarray, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a target block, checking it is exactly that rectangle listed row-major."""
    rows, columns = np.divmod(block, width)
    top, left = rows.min(), columns.min()
    height, block_width = rows.max() - top + 1, columns.max() - left + 1
    expected = ((np.arange(top, top + height)[:, None]) * width + np.arange(left, left + block_width)).reshape(-1)
    np.testing.assert_array_equal(block, expected)
    return int(top), int(left), int(height), int(block_width)


def check_batch(batch: dict, collator: MultiBlockCollator, batch_size: int) -> None:
    height, width = collator.grid
    context, targets = batch["context"], batch["targets"]
    assert context.dtype == torch.long and targets.dtype == torch.long
    assert context.ndim == 2 and context.shape[0] == batch_size
    assert targets.ndim == 3 and targets.shape[:2] == (batch_size, collator.num_targets)
    assert context.shape[1] >= collator.min_context
    assert int(context.min()) >= 0 and int(context.max()) < height * width
    assert int(targets.min()) >= 0 and int(targets.max()) < height * width
    shapes = set()
    for kept, blocks in zip(context.numpy(), targets.numpy()):
        assert np.all(np.diff(kept) > 0), "context must be sorted ascending, without repeats"
        assert not np.intersect1d(kept, blocks.reshape(-1)).size, "context and targets overlap"
        shapes.update(rectangle(block, width)[2:] for block in blocks)
    assert len(shapes) == 1, f"one target size per batch, got {shapes}"
    ((block_height, block_width),) = shapes
    assert targets.shape[2] == block_height * block_width


# --- placement ---------------------------------------------------------------------------------------------


# (grid, block area, aspect): fixed target sizes 4x4 on 14x14 and 2x3 on a 6x10 grid.
PLACEMENT_CASES = [((14, 14), 16, 1.0, (4, 4)), ((6, 10), 6, 2 / 3, (2, 3))]


@pytest.mark.parametrize("grid, area, aspect, size", PLACEMENT_CASES)
def test_target_corners_are_uniform_over_every_valid_position(grid, area, aspect, size):
    height, width = grid
    scale = area / (height * width)
    # A full-grid context never forces a redraw here, so the corners are the plain draws.
    collator = MultiBlockCollator(
        grid, seed=3, target_scale=(scale, scale), target_aspect=(aspect, aspect), context_scale=(1.0, 1.0)
    )
    tops, lefts, covered = [], [], np.zeros(height * width, dtype=bool)
    for batch_number in range(40):
        batch = collator(fake_samples(range(batch_number * 32, (batch_number + 1) * 32)))
        for blocks in batch["targets"].numpy():
            for block in blocks:
                top, left, block_height, block_width = rectangle(block, width)
                assert (block_height, block_width) == size
                tops.append(top)
                lefts.append(left)
                covered[block] = True
    # Rows 0..H-h and columns 0..W-w inclusive: an exclusive upper bound would leave the last bin empty.
    row_counts = np.bincount(tops, minlength=height - size[0] + 1)
    column_counts = np.bincount(lefts, minlength=width - size[1] + 1)
    assert len(row_counts) == height - size[0] + 1 and len(column_counts) == width - size[1] + 1
    assert chisquare(row_counts).pvalue > 1e-3, row_counts
    assert chisquare(column_counts).pvalue > 1e-3, column_counts
    covered = covered.reshape(height, width)
    assert covered[-1].any() and covered[:, -1].any() and covered.all()


def test_context_block_has_its_size_and_reaches_every_edge():
    # A 7x7 context block and 1x1 targets: the context lies in a 7x7 box, and over many images it touches
    # the first and the last row and column.
    collator = MultiBlockCollator(
        14, seed=0, num_targets=1, target_scale=(1 / 196, 1 / 196), context_scale=(0.25, 0.25), min_context=10
    )
    rows, columns = [], []
    for batch_number in range(10):
        batch = collator(fake_samples(range(batch_number * 16, (batch_number + 1) * 16)))
        check_batch(batch, collator, 16)
        assert batch["context"].shape[1] == 48  # 49 patches minus at most one target
        for kept in batch["context"].numpy():
            r, c = np.divmod(kept, 14)
            assert r.max() - r.min() < 7 and c.max() - c.min() < 7
            rows.extend(r)
            columns.extend(c)
    assert min(rows) == 0 and max(rows) == 13 and min(columns) == 0 and max(columns) == 13


# --- context subset ----------------------------------------------------------------------------------------


def keep_first(available: list[np.ndarray], keep: int) -> list[np.ndarray]:
    """The official I-JEPA way to equalise counts: each context truncated to its first `keep` indices."""
    return [patches[:keep] for patches in available]


def test_context_subset_has_no_position_bias_and_first_k_truncation_fails():
    # With a full-grid context block, the context before equalising is "all patches minus the targets", which the
    # output gives. Given the context kept n patches and the batch keeps K, each patch should be dropped with
    # probability 1 - K/n whatever its position. Chi-square of the dropped counts per position against that.
    collator = MultiBlockCollator(14, seed=1, context_scale=(1.0, 1.0))
    ours, first_k, expected = np.zeros(196), np.zeros(196), np.zeros(196)
    for batch_number in range(60):
        batch = collator(fake_samples(range(batch_number * 32, (batch_number + 1) * 32)))
        keep = batch["context"].shape[1]
        available = []
        for kept, blocks in zip(batch["context"].numpy(), batch["targets"].numpy()):
            free = np.ones(196, dtype=bool)
            free[blocks.reshape(-1)] = False
            patches = np.flatnonzero(free)
            assert np.isin(kept, patches).all()
            available.append(patches)
            ours[np.setdiff1d(patches, kept)] += 1
            expected[patches] += 1 - keep / len(patches)
        for patches, truncated in zip(available, keep_first(available, keep)):
            first_k[np.setdiff1d(patches, truncated)] += 1
    assert ours.sum() > 10_000, "the counts must vary, or nothing is dropped and the test says nothing"
    assert chisquare(ours, expected).pvalue > 1e-3
    assert chisquare(first_k, expected).pvalue < 1e-10  # truncation drops the bottom-right patches
    # Plainly: the top and the bottom halves of the grid lose their share.
    top, bottom = ours[:98].sum() / expected[:98].sum(), ours[98:].sum() / expected[98:].sum()
    assert abs(top - bottom) < 0.05, (top, bottom)


# --- shapes, min_context -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grid": 14},
        {"grid": (8, 12), "num_targets": 2, "target_aspect": (0.5, 2.0), "context_scale": (0.6, 0.9)},
        {"grid": 16, "num_targets": 1, "context_aspect": (0.5, 2.0), "min_context": 40},
        {"grid": 3, "num_targets": 3, "target_scale": (0.1, 0.3), "min_context": 1},
    ],
)
def test_batches_have_disjoint_sorted_context_and_rectangular_targets(kwargs):
    collator = MultiBlockCollator(seed=5, **kwargs)
    sizes = set()
    for batch_number in range(12):
        batch = collator(fake_samples(range(batch_number * 8, (batch_number + 1) * 8), epoch=batch_number % 3))
        check_batch(batch, collator, 8)
        sizes.add(batch["targets"].shape[2])
    if collator.grid[0] > 3:
        assert len(sizes) > 1, "the target size is drawn per batch"


def test_default_target_size_follows_the_scale_and_aspect():
    collator = MultiBlockCollator(14, seed=2)
    for batch_number in range(30):
        batch = collator(fake_samples(range(batch_number * 4, (batch_number + 1) * 4)))
        _, _, block_height, block_width = rectangle(batch["targets"][0, 0].numpy(), 14)
        # area 0.15..0.2 of 196 = 29.4..39.2 and h/w in 0.75..1.5, give or take the rounding of h and w.
        assert 25 <= block_height * block_width <= 45
        assert 0.6 <= block_height / block_width <= 1.8


def test_targets_are_redrawn_until_min_context_patches_remain():
    # 6x6 grid, full context, four 2x2 targets: min_context=23 needs the blocks to cover at most 13 patches,
    # which one draw of four uniform blocks does about half the time (0.49, by simulation). 40 images all
    # passing without redraws would have probability ~0.49**40 < 1e-12.
    collator = MultiBlockCollator(
        6, seed=0, target_scale=(4 / 36, 4 / 36), target_aspect=(1.0, 1.0), context_scale=(1.0, 1.0), min_context=23
    )
    for batch_number in range(5):
        batch = collator(fake_samples(range(batch_number * 8, (batch_number + 1) * 8)))
        check_batch(batch, collator, 8)
        assert batch["context"].shape[1] >= 23
        for blocks in batch["targets"].numpy():
            assert len(np.unique(blocks)) <= 13


def test_impossible_min_context_raises_a_clear_error():
    # Four 2x2 blocks cover at least 4 of the 36 patches, so at most 32 remain.
    collator = MultiBlockCollator(
        6, target_scale=(4 / 36, 4 / 36), target_aspect=(1.0, 1.0), context_scale=(1.0, 1.0), min_context=33
    )
    with pytest.raises(RuntimeError, match="lower min_context"):
        collator(fake_samples(range(4)))


# --- seeding -----------------------------------------------------------------------------------------------


def assert_same(first: dict, second: dict) -> None:
    assert torch.equal(first["context"], second["context"]) and torch.equal(first["targets"], second["targets"])


def test_output_depends_only_on_seed_epoch_and_indices():
    samples = fake_samples([7, 3, 11, 42, 5], epoch=2)
    first = MultiBlockCollator(14, seed=4)(samples)
    np.random.seed(123)
    torch.manual_seed(123)
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    collator = MultiBlockCollator(14, seed=4)
    assert_same(first, collator(samples))
    assert_same(first, collator(samples))
    # The global RNGs are neither read nor advanced.
    assert np.array_equal(np.random.get_state()[1], numpy_state) and torch.equal(torch.get_rng_state(), torch_state)

    for other in (MultiBlockCollator(14, seed=5)(samples), collator(fake_samples([7, 3, 11, 42, 5], epoch=3))):
        assert not torch.equal(first["targets"], other["targets"])


def test_target_positions_do_not_depend_on_the_rest_of_the_batch():
    # Fixed sizes: then a sample's blocks come from (seed, epoch, index, block) alone.
    collator = MultiBlockCollator(
        14, seed=9, target_scale=(0.15, 0.15), target_aspect=(1.0, 1.0), context_scale=(0.9, 0.9)
    )
    alone = collator(fake_samples([17]))["targets"][0]
    first = collator(fake_samples([17, 1, 2, 3]))["targets"][0]
    last = collator(fake_samples([8, 9, 17]))["targets"][2]
    assert torch.equal(alone, first) and torch.equal(alone, last)
    # The per-batch sizes may follow the batch: with a size range, some other batch gets another size.
    varied = MultiBlockCollator(14, seed=9)
    assert len({varied(fake_samples([17, other]))["targets"].shape[2] for other in range(20)}) > 1


# --- arguments and collation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"grid": 0}, "grid"),
        ({"grid": (14, 0)}, "grid"),
        ({"seed": -1}, "seed"),
        ({"num_targets": 0}, "num_targets"),
        ({"target_scale": (0.0, 0.2)}, "target_scale"),
        ({"target_scale": (0.5, 1.5)}, "target_scale"),
        ({"target_scale": (0.3, 0.2)}, "target_scale"),
        ({"target_aspect": (0.0, 1.0)}, "target_aspect"),
        ({"target_aspect": (2.0, 1.0)}, "target_aspect"),
        ({"context_scale": (0.85, 1.01)}, "context_scale"),
        ({"context_aspect": (-1.0, 1.0)}, "context_aspect"),
        ({"min_context": 0}, "min_context"),
        ({"min_context": 197}, "min_context"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, argument):
    arguments = {"grid": 14, **kwargs}
    with pytest.raises(ValueError, match=argument):
        MultiBlockCollator(**arguments)


def test_crops_labels_and_indices_are_collated_like_collate_crops():
    generator = torch.Generator().manual_seed(0)
    samples = [
        {
            "crops": [torch.rand(3, 8, 8, generator=generator), torch.rand(3, 4, 4, generator=generator)],
            "label": label,
            "index": index,
            "epoch": 1,
        }
        for label, index in ((3, 10), (1, 4), (3, 7))
    ]
    batch, reference = MultiBlockCollator(14)(samples), collate_crops(samples)
    assert set(batch) == set(reference) | {"context", "targets"}
    assert all(torch.equal(a, b) for a, b in zip(batch["crops"], reference["crops"], strict=True))
    assert torch.equal(batch["labels"], reference["labels"]) and torch.equal(batch["indices"], reference["indices"])
