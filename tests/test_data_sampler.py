"""ResumableDistributedSampler: deterministic epoch order, mid-epoch resume, ranks that add up to one run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ssd.data import (
    DigitsDataset,
    MultiCropAugmentation,
    ResumableDistributedSampler,
    SeededCropsDataset,
    collate_crops,
)


def indices(sampler: ResumableDistributedSampler) -> list[int]:
    keys = list(sampler)
    assert all(epoch == sampler.epoch for epoch, _ in keys)
    return [index for _, index in keys]


def epoch_order(dataset_len: int, epoch: int, **kwargs) -> list[int]:
    sampler = ResumableDistributedSampler(dataset_len, **kwargs)
    sampler.set_epoch(epoch)
    return indices(sampler)


def test_order_depends_only_on_seed_and_epoch():
    sampler = ResumableDistributedSampler(50, seed=3)
    for epoch in (5, 0, 9):  # visiting other epochs first changes nothing
        sampler.set_epoch(epoch)
        list(sampler)
    sampler.set_epoch(2)
    assert indices(sampler) == epoch_order(50, 2, seed=3)
    assert sorted(epoch_order(50, 2, seed=3)) == list(range(50))  # one rank: a permutation of everything
    assert epoch_order(50, 2, seed=3) != epoch_order(50, 2, seed=4)
    assert epoch_order(50, 2, seed=3, shuffle=False) == list(range(50))
    # Keys yielded are (epoch, index) pairs for SeededCropsDataset.
    assert next(iter(sampler)) == (2, epoch_order(50, 2, seed=3)[0])


def test_epochs_are_different_permutations():
    orders = [tuple(epoch_order(50, epoch)) for epoch in range(10)]
    assert len(set(orders)) == 10
    assert epoch_order(50, 1) != list(range(50))


@pytest.mark.parametrize("num_replicas, rank", [(1, 0), (3, 2)])
def test_mid_epoch_start_continues_exactly(num_replicas, rank):
    sampler = ResumableDistributedSampler(47, num_replicas=num_replicas, rank=rank, seed=1)
    sampler.set_epoch(4)
    full = indices(sampler)
    assert len(sampler) == len(full) == 47 // num_replicas
    for start in (0, 1, 7, len(full)):
        sampler.set_epoch(4, start=start)
        assert indices(sampler) == full[start:] and len(sampler) == len(full) - start
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(4, start=len(full) + 1)
    sampler.set_epoch(5)  # a new epoch starts from its beginning again
    assert len(sampler) == len(full)


@pytest.mark.parametrize("num_replicas, batch_size", [(2, 4), (3, 5), (4, 1)])
def test_union_of_ranks_kth_batches_is_the_single_process_kth_batch(num_replicas, batch_size):
    dataset_len, epoch = 103, 6
    single = epoch_order(dataset_len, epoch, seed=9)
    per_rank = [
        epoch_order(dataset_len, epoch, seed=9, num_replicas=num_replicas, rank=r)
        for r in range(num_replicas)
    ]

    samples_per_rank = dataset_len // num_replicas
    assert all(len(rank_indices) == samples_per_rank for rank_indices in per_rank)
    used = [index for rank_indices in per_rank for index in rank_indices]
    assert len(set(used)) == len(used) == samples_per_rank * num_replicas  # disjoint, only the tail dropped

    global_batch = num_replicas * batch_size
    for k in range(samples_per_rank // batch_size):
        union = set()
        for rank_indices in per_rank:
            union.update(rank_indices[k * batch_size : (k + 1) * batch_size])
        assert union == set(single[k * global_batch : (k + 1) * global_batch]), k


def test_state_dict_round_trip_and_world_size_change():
    sampler = ResumableDistributedSampler(40, num_replicas=2, rank=1, seed=5)
    sampler.set_epoch(3, start=6)
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["start"] == 6 and state["seed"] == 5

    restored = ResumableDistributedSampler(40, num_replicas=2, rank=1, seed=0)
    restored.load_state_dict(state)
    assert indices(restored) == indices(sampler) and restored.seed == 5

    # 2 ranks x 6 samples consumed = 12 global positions = 3 ranks x 4 samples: the remaining samples match.
    remaining_single = epoch_order(40, 3, seed=5)[12:]
    three = [ResumableDistributedSampler(40, num_replicas=3, rank=r) for r in range(3)]
    for rank_sampler in three:
        rank_sampler.load_state_dict(state)
        assert rank_sampler.start == 4
    remaining_three = [index for rank_sampler in three for index in indices(rank_sampler)]
    assert set(remaining_three) == set(remaining_single[: len(remaining_three)])
    with pytest.raises(ValueError, match="does not split evenly"):
        ResumableDistributedSampler(40, num_replicas=5).load_state_dict(state)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="too small"):
        ResumableDistributedSampler(3, num_replicas=4, rank=0)


def batches(dataset, sampler, num_workers: int) -> list[dict]:
    loader = DataLoader(
        dataset, batch_size=6, sampler=sampler, collate_fn=collate_crops, num_workers=num_workers
    )
    return list(loader)


def test_dataloader_workers_and_resume_give_identical_batches(torch_single_thread):
    digits = DigitsDataset("test", image_size=16)
    dataset = SeededCropsDataset(
        digits, MultiCropAugmentation(global_size=16, local_number=2, local_size=8), seed=2
    )
    # A sampler over the first 36 images only: a short epoch keeps the test fast.
    sampler = ResumableDistributedSampler(36, seed=2)
    sampler.set_epoch(1)

    in_process = batches(dataset, sampler, num_workers=0)
    with_workers = batches(dataset, sampler, num_workers=2)
    sampler.set_epoch(1, start=12)  # resume after two batches of 6
    resumed = batches(dataset, sampler, num_workers=2)

    assert len(in_process) == len(with_workers) == 6 and len(resumed) == 4
    pairs = list(zip(in_process, with_workers, strict=True)) + list(zip(in_process[2:], resumed, strict=True))
    for reference, candidate in pairs:
        assert torch.equal(reference["indices"], candidate["indices"])
        assert torch.equal(reference["labels"], candidate["labels"])
        assert all(torch.equal(a, b) for a, b in zip(reference["crops"], candidate["crops"], strict=True))
