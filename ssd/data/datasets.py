"""`build_dataset`: the one way a config names a data set (data.dataset=... data.root=...).

The classes live in small files (`folders.py`, `cifar10.py`, `digits.py`); `ssd.data` exports them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssd.data.cifar10 import CIFAR10Dataset
from ssd.data.digits import DigitsDataset
from ssd.data.folders import DatasetError, ImageDataset, ImageFolderDataset, UnlabeledFolderDataset
from ssd.data.image_io import DEFAULT_MAX_IMAGE_PIXELS

DATASET_NAMES = ("digits", "cifar10", "imagefolder", "folder")


def build_dataset(cfg: Any, split: str | None = None) -> ImageDataset:
    """Build the data set described by `cfg` (a dataclass or OmegaConf node with the fields below).

    cfg.dataset: "digits" | "cifar10" | "imagefolder" | "folder"
    cfg.root: folder of the data (unused for digits)
    cfg.split: "train" (default) / "test" / "val" ...; the `split` argument overrides it
    cfg.holdout_fraction: share of digits held out as its test split (default 0.2)
    cfg.max_image_pixels: larger image files are unreadable (folder data sets; CIFAR and digits are arrays)

    For the two folder data sets, `root/<split>` is used when it exists, else `root` itself, so both an
    ImageNet-style root (with train/ and val/) and a folder of one split work. The digits split does not
    depend on the run's seed, so runs with different seeds are evaluated on the same held-out images.
    """
    name = getattr(cfg, "dataset", None)
    split = split if split is not None else (getattr(cfg, "split", None) or "train")
    if name == "digits":
        return DigitsDataset(split, holdout_fraction=float(getattr(cfg, "holdout_fraction", 0.2)))
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r} (data.dataset); valid names: {', '.join(DATASET_NAMES)}")
    root = getattr(cfg, "root", None)
    if not root:
        raise DatasetError(
            f"data.root must name the folder of the {name} data set, e.g. data.root=/path/to/{name}"
        )
    root = Path(str(root)).expanduser()
    if name == "cifar10":
        return CIFAR10Dataset(root, split)
    folder = root / split if (root / split).is_dir() else root
    if folder == root and split != "train" and (root / "train").is_dir():
        # Without this check root/train would silently become a class (or a sub-folder) of the eval data.
        raise DatasetError(f"{root} has a train/ folder but no {split}/ folder for split {split!r}")
    max_pixels = int(getattr(cfg, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    if name == "imagefolder":
        return ImageFolderDataset(folder, max_pixels)
    return UnlabeledFolderDataset(folder, max_pixels)
