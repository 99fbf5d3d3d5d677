"""Data for pretraining: data sets, robust image loading, DINO multi-crop, seeded crops, resumable sampler.

A run wires them as

    dataset = build_dataset(cfg.data)                                   # load(i) -> (RGB image, label)
    samples = SeededCropsDataset(dataset, MultiCropAugmentation(), seed, on_bad_image)
    sampler = ResumableDistributedSampler(len(dataset), world_size, rank, seed)   # yields (epoch, index)
    loader = DataLoader(samples, batch_size, sampler=sampler, collate_fn=collate_crops, drop_last=True)

With MultiCropAugmentation(photometric_on="device") the batches hold uint8 crops and a "photometric" parameter
tensor; deferred_photometric.apply_photometric turns them into the normalised crops on the training device.
"""

from ssd.data.cifar10 import CIFAR10_CLASSES, CIFAR10Dataset
from ssd.data.datasets import DATASET_NAMES, build_dataset
from ssd.data.digits import DigitsDataset
from ssd.data.folders import (
    UNLABELED,
    DatasetError,
    FileListDataset,
    ImageDataset,
    ImageFolderDataset,
    SkippedLinkWarning,
    UnlabeledFolderDataset,
    find_images,
)
from ssd.data.image_io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    is_image_file,
    load_rgb,
)
from ssd.data.masking import MaskingCollator, block_mask, masked_indices
from ssd.data.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    blur_kernel_size,
    eval_transform,
)
from ssd.data.sampler import ResumableDistributedSampler
from ssd.data.seeded import BadImageWarning, SeededCropsDataset, collate_crops, mix_seeds

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "UNLABELED",
    "BadImageWarning",
    "CIFAR10Dataset",
    "DatasetError",
    "DigitsDataset",
    "FileListDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "MaskingCollator",
    "MultiCropAugmentation",
    "ResumableDistributedSampler",
    "SeededCropsDataset",
    "SkippedLinkWarning",
    "UnlabeledFolderDataset",
    "UnreadableImageError",
    "block_mask",
    "blur_kernel_size",
    "build_dataset",
    "collate_crops",
    "eval_transform",
    "find_images",
    "is_image_file",
    "load_rgb",
    "masked_indices",
    "mix_seeds",
]
