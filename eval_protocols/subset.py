"""A class-balanced, seeded part of a data split, so that an evaluation can be a smoke test of seconds.

``--limit N`` keeps at most N images of each split and ``--fraction f`` keeps a share f of it (both: the smaller).
The images are taken class by class in turn (a seeded shuffle within each class), so 100 images of a 10-class
split are 10 per class whatever the order of the files; the same arguments always give the same images.
"""

from __future__ import annotations

import math

import torch


def subset_size(total: int, limit: int | None, fraction: float | None) -> int:
    """How many of ``total`` images ``--limit`` / ``--fraction`` keep (at least one when the split has any)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 image per split, not {limit}; leave it out to use every image")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], not {fraction}; e.g. --fraction 0.1 keeps a tenth")
    size = total
    if fraction is not None:
        size = max(1, math.ceil(fraction * total))
    if limit is not None:
        size = min(size, limit)
    return min(size, total)


def balanced_indices(targets, size: int, seed: int = 0) -> list[int]:
    """``size`` indices of ``targets`` taken round-robin over the classes (in label order), each class in a
    seeded random order; sorted, so that the subset keeps the split's own order."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor([int(label) for label in targets], dtype=torch.long)
    # (classes, longest class) table of each class's shuffled members, padded with -1, read column by column.
    members = []
    for label in torch.unique(targets).tolist():
        indices = torch.nonzero(targets == label).flatten()
        members.append(indices[torch.randperm(len(indices), generator=generator)])
    longest = max((len(m) for m in members), default=0)
    table = torch.full((len(members), longest), -1, dtype=torch.long)
    for row, indices in enumerate(members):
        table[row, :len(indices)] = indices
    order = table.t().flatten()
    return sorted(order[order >= 0][:size].tolist())


class Subset:
    """An ssd dataset restricted to ``indices`` (the same ``load`` / ``describe`` / ``classes`` / ``targets``)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.classes = getattr(dataset, "classes", [])
        self.targets = [dataset.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.dataset.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.dataset.describe(self.indices[index])


def limit_dataset(dataset, limit: int | None, fraction: float | None, seed: int = 0):
    """``dataset`` itself when neither option is given, else its class-balanced ``Subset``."""
    if limit is None and fraction is None:
        return dataset
    size = subset_size(len(dataset), limit, fraction)
    return Subset(dataset, balanced_indices(dataset.targets, size, seed))
