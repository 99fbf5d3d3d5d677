"""A distributed sampler whose order depends only on (seed, epoch) and that can resume mid-epoch.

Key property (tested): the epoch permutation `perm` is the same on every rank and every world size, and
rank r takes the interleaved slice perm[r::R]. Rank r's k-th batch of size b is therefore
perm[R*k*b + r :: R][:b], and the union over the R ranks of their k-th batches is exactly
perm[R*k*b : R*(k+1)*b], the k-th batch of size R*b of a 1-rank sampler. So an R-process run with
per-rank batch b sees the same images (and, with `SeededCropsDataset`, the same crops) at every step as a
1-process run with batch R*b.

Resuming: the sampler cannot know how far training got (DataLoader workers prefetch ahead of the loop), so
the training loop tells it: `set_epoch(epoch, start=steps_done_in_epoch * per_rank_batch_size)`, then
`state_dict()` to save, or `load_state_dict(saved)` on restart. A start saved with R ranks is converted on
load to the new world size when possible, since the global position start * R does not depend on R.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ssd.data.seeded import mix_seeds


class ResumableDistributedSampler(Sampler):
    """Yields `(epoch, index)` keys for `SeededCropsDataset`: this rank's share of the epoch, from `start`."""

    def __init__(
        self, dataset_len: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}"
            )
        if dataset_len < num_replicas:
            raise ValueError(f"data set of {dataset_len} samples is too small for {num_replicas} ranks")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        # The last dataset_len % num_replicas samples of each epoch's permutation are dropped so that every
        # rank runs the same number of steps (an uneven count would hang collective ops at the epoch's end).
        self.samples_per_rank = dataset_len // num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and how many of this rank's samples of it were already consumed."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start must be in [0, {self.samples_per_rank}], got {start}")
        self.epoch = epoch
        self.start = start

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The order of all dataset_len indices in `epoch`, identical on every rank. (dataset_len,) int64."""
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        generator = torch.Generator()
        generator.manual_seed(mix_seeds(self.seed, epoch))
        return torch.randperm(self.dataset_len, generator=generator)

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """This rank's samples of `epoch`, in order, before applying `start`. (samples_per_rank,) int64."""
        used = self.epoch_permutation(epoch)[: self.samples_per_rank * self.num_replicas]
        return used[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.rank_indices(epoch)[self.start :].tolist():
            yield epoch, index

    def __len__(self) -> int:
        return self.samples_per_rank - self.start

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "start": self.start,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch, start and seed; a start saved under another world size is converted when exact."""
        saved_replicas = int(state.get("num_replicas", self.num_replicas))
        consumed_globally = int(state["start"]) * saved_replicas
        if consumed_globally >= self.samples_per_rank * self.num_replicas:
            start = self.samples_per_rank  # the saved epoch was finished (only a dropped tail was left)
        elif consumed_globally % self.num_replicas == 0:
            start = consumed_globally // self.num_replicas
        else:
            raise ValueError(
                f"cannot resume mid-epoch: {consumed_globally} samples were consumed by {saved_replicas} "
                f"ranks, which does not split evenly over {self.num_replicas} ranks; resume with "
                f"{saved_replicas} ranks or from an end-of-epoch checkpoint"
            )
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]), start=start)
