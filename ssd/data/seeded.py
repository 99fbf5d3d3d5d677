"""Reproducible augmentation: the crops of a sample depend only on (seed, epoch, index).

DataLoader workers each own an RNG whose state depends on the worker count and on which worker got which
batch, so a resumed run (or a run with a different `num_workers` or number of processes) would see different
crops. Seeding torch's RNG from (seed, epoch, index) around each sample's transform removes that dependence:
the sampler hands out `(epoch, index)` keys and the crops follow from them alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ssd.data.image_io import UnreadableImageError

BAD_IMAGE_POLICIES = ("skip", "fail")

# Unreadable files skipped in this process (each DataLoader worker counts its own).
_skipped_in_process = 0


class BadImageWarning(UserWarning):
    """An unreadable image was skipped: replaced by the next one in training, left out in evaluation."""


def check_bad_image_policy(policy: str) -> None:
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")


def skip_or_fail(error: UnreadableImageError, name: str, policy: str, how_to_skip: str) -> None:
    """Apply the bad-image policy to one unreadable image `name`: raise (policy "fail"; the message says
    `how_to_skip`) or warn with a BadImageWarning and count it (policy "skip"), then return."""
    global _skipped_in_process
    if policy == "fail":
        raise UnreadableImageError(error.path, f"{error.reason} ({how_to_skip} to skip unreadable images)") from error
    _skipped_in_process += 1
    warnings.warn(
        f"skipping unreadable image {name} ({error.reason}); {_skipped_in_process} skipped so far in this process",
        BadImageWarning,
        stacklevel=3,
    )


def mix_seeds(*values: int) -> int:
    """Hash non-negative integers into one 64-bit seed with numpy's SeedSequence.

    A plain sum would make (epoch=1, index=0) and (epoch=0, index=1) share crops; SeedSequence mixes its
    inputs so that nearby tuples give unrelated seeds.
    """
    if any(value < 0 for value in values):
        raise ValueError(f"seeds must be non-negative integers, got {values}")
    return int(np.random.SeedSequence([int(value) for value in values]).generate_state(1, dtype=np.uint64)[0])


class SeededCropsDataset(Dataset):
    """Wraps a data set (see `ImageDataset`) and a transform; item `(epoch, index)` -> seeded sample dict.

    Returns {"crops": transform(image), "label": int, "index": int, "epoch": int}. "index" is the index of the image that
    was actually used: it differs from the requested one only when an unreadable image was skipped.
    on_bad_image="skip": warn (BadImageWarning) and use the next readable image, (index + 1) % len, ...
    on_bad_image="fail": raise UnreadableImageError naming the file.
    """

    def __init__(self, dataset: Any, transform: Callable, seed: int = 0, on_bad_image: str = "skip"):
        check_bad_image_policy(on_bad_image)
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        image, label, used_index = self._load_readable(int(index))
        # The seed comes from the requested index, not the substitute, so a skip changes nothing else.
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only, which the transforms draw from and fork_rng(devices=[]) restores:
            # torch.manual_seed would also queue seeds for every accelerator (60 us a call on CPU-only machines).
            torch.default_generator.manual_seed(mix_seeds(self.seed, epoch, index))
            crops = self.transform(image)
        # A transform that leaves colour steps to the device returns {"crops": ..., "photometric": ...}.
        views = crops if isinstance(crops, dict) else {"crops": crops}
        return {**views, "label": int(label), "index": used_index, "epoch": int(epoch)}

    def _load_readable(self, index: int):
        size = len(self.dataset)
        for attempt in range(size):
            candidate = (index + attempt) % size
            try:
                image, label = self.dataset.load(candidate)
                return image, label, candidate
            except UnreadableImageError as error:
                skip_or_fail(error, self.dataset.describe(candidate), self.on_bad_image, "set data.on_bad_image=skip")
        raise RuntimeError(f"all {size} images of {self.dataset!r} are unreadable")


def collate_crops(samples: list[dict]) -> dict:
    """Stack per-sample dicts into {"crops": V tensors (B, 3, H, W), "labels": (B,), "indices": (B,)}, and, when
    the samples carry deferred colour steps, "photometric": (V, B, NUM_PARAMS)."""
    num_views = len(samples[0]["crops"])
    crops = [torch.stack([sample["crops"][view] for sample in samples]) for view in range(num_views)]
    batch = {
        "crops": crops,
        "labels": torch.tensor([sample["label"] for sample in samples], dtype=torch.long),
        "indices": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
    }
    if "photometric" in samples[0]:
        batch["photometric"] = torch.stack([sample["photometric"] for sample in samples], dim=1)
    return batch
