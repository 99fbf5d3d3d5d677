"""--limit / --fraction: a class-balanced, seeded part of each split, on real image files."""

from __future__ import annotations

from collections import Counter

import pytest

from eval_protocols.subset import balanced_indices, limit_dataset, subset_size


def test_classes_are_taken_in_turn_until_one_runs_out():
    targets = [0] * 50 + [1] * 10 + [2] * 5  # unbalanced, grouped by class like an ImageFolder
    chosen = balanced_indices(targets, 15, seed=0)
    assert Counter(targets[i] for i in chosen) == {0: 5, 1: 5, 2: 5}
    # Class 2 has only 5: the other classes share the rest in turn.
    assert Counter(targets[i] for i in balanced_indices(targets, 25, seed=0)) == {0: 10, 1: 10, 2: 5}
    assert chosen == sorted(chosen) and len(set(chosen)) == 15  # the split's own order, no repeats
    assert balanced_indices(targets, 15, seed=0) == chosen  # deterministic
    assert balanced_indices(targets, 15, seed=1) != chosen  # and seeded
    assert balanced_indices(targets, 100, seed=0) == list(range(65))  # more than there are: everything


def test_limit_and_fraction_sizes():
    assert subset_size(1000, None, None) == 1000
    assert subset_size(1000, 100, None) == 100
    assert subset_size(1000, None, 0.05) == 50
    assert subset_size(1000, 100, 0.05) == 50  # both: the smaller
    assert subset_size(10, None, 0.01) == 1  # never an empty split
    assert subset_size(10, 500, None) == 10
    with pytest.raises(ValueError, match="--limit must be at least 1"):
        subset_size(10, 0, None)
    with pytest.raises(ValueError, match=r"--fraction must be in \(0, 1\]"):
        subset_size(10, None, 0.0)


def test_a_limited_image_folder_reads_its_own_files(tiny_image_folder):
    from ssd.data import ImageFolderDataset

    dataset = ImageFolderDataset(tiny_image_folder)  # 2 classes x 6 real JPEG / PNG files
    limited = limit_dataset(dataset, 4, None, seed=0)
    assert len(limited) == 4 and Counter(limited.targets) == {0: 2, 1: 2}
    assert limited.classes == dataset.classes
    for position, index in enumerate(limited.indices):
        assert limited.describe(position) == dataset.describe(index)
        image, label = limited.load(position)
        assert label == dataset.targets[index] and image.size == (40, 40)
    assert limit_dataset(dataset, None, None) is dataset  # no option: the split itself
    assert len(limit_dataset(dataset, None, 0.5, seed=3)) == 6
