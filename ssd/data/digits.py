"""scikit-learn's 8x8 handwritten digits as a tiny RGB image data set for CPU smoke runs and tests.

It ships inside scikit-learn (no download), has 1,797 labelled images in 10 classes, and is small enough for a
pretraining + k-NN run to finish in seconds on a laptop.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ssd.data.folders import ImageDataset

DIGITS_MAX_VALUE = 16.0  # load_digits() pixel values are counts 0..16 of a 4x4 block of the original scan


class DigitsDataset(ImageDataset):
    """The `split` ("train" or "test") of load_digits(), upscaled (bilinear) to image_size x image_size RGB.

    The split is stratified by class and depends only on (seed, holdout_fraction): train and test are disjoint
    and together hold all 1,797 images. Indices within a split are in the original order.
    """

    def __init__(
        self, split: str = "train", holdout_fraction: float = 0.2, seed: int = 0, image_size: int = 32
    ):
        if split not in ("train", "test"):
            raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be strictly between 0 and 1, got {holdout_fraction}")
        # Imported here: scikit-learn (with scipy) adds ~1 s to `import ssd.data`, and only digits needs it.
        from sklearn.model_selection import train_test_split

        images, labels = _load_digits()
        train_indices, test_indices = train_test_split(
            np.arange(len(labels)), test_size=holdout_fraction, random_state=seed, stratify=labels
        )
        # Sorting keeps a fixed, readable order; the shuffling is the sampler's job.
        self.source_indices = np.sort(train_indices if split == "train" else test_indices)
        self.split = split
        self.classes = [str(digit) for digit in range(10)]
        self.targets = [int(labels[i]) for i in self.source_indices]
        self._images = _upscale(images[self.source_indices], image_size)  # (N, S, S) uint8

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self._images[index]).convert("RGB"), self.targets[index]

    def describe(self, index: int) -> str:
        return f"digits[{int(self.source_indices[index])}]"


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float images in 0..16 and (1797,) labels, parsed once per process and shared read-only."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for array in (digits.images, digits.target):
        array.setflags(write=False)
    return digits.images, digits.target


def _upscale(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 8, 8) floats in 0..16 -> (N, S, S) uint8 in 0..255 with S = image_size, bilinear, once."""
    scaled = images.astype(np.float32) * (255.0 / DIGITS_MAX_VALUE)
    batch = torch.from_numpy(scaled).unsqueeze(1)  # (N, 1, 8, 8)
    resized = F.interpolate(batch, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return resized.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
