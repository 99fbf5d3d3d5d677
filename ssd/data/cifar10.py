"""CIFAR-10 from either of its two common on-disk forms, without torchvision's download/md5 machinery.

1. torchvision's python release: `root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`
   (or `root` pointing at `cifar-10-batches-py` itself).
2. An ImageFolder copy: `root/{train,test}/<class>/*.jpg`, or `root/cifar10/{train,test}/...` as the shared
   `cifar10-jpeg.zip` extracts.
"""

from __future__ import annotations

import bisect
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from ssd.data.folders import DatasetError, ImageDataset, ImageFolderDataset

# Label order of the original release; alphabetical, so an ImageFolder copy sorts to the same labels.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLIT_FILES = {"train": [f"data_batch_{number}" for number in range(1, 6)], "test": ["test_batch"]}
PICKLE_FOLDER = "cifar-10-batches-py"

# The release is a pickle of dicts holding numpy arrays. pickle.load can run arbitrary code from a crafted
# file, so only the globals a numpy array needs are allowed; anything else is refused with an error.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    with open(path, "rb") as file:
        # encoding="bytes": the files were written by Python 2, keys come back as b"data", b"labels".
        return _ArrayOnlyUnpickler(file, encoding="bytes").load()


class CIFAR10Dataset(ImageDataset):
    """CIFAR-10 `split` ("train": 50,000 images, "test": 10,000) as 32x32 RGB PIL images with labels 0..9."""

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        if split not in SPLIT_FILES:
            raise ValueError(f"CIFAR-10 split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.classes = list(CIFAR10_CLASSES)
        self._folder: ImageFolderDataset | None = None
        self._images: np.ndarray | None = None  # (N, 32, 32, 3) uint8 when read from the pickles

        pickle_dir = _find_pickle_dir(self.root)
        if pickle_dir is not None:
            self._read_pickles(pickle_dir)
            return
        for folder in (self.root / split, self.root / "cifar10" / split):
            if folder.is_dir():
                self._folder = ImageFolderDataset(folder)
                if self._folder.classes != CIFAR10_CLASSES:
                    raise DatasetError(
                        f"{folder} has class folders {self._folder.classes}, expected the CIFAR-10 classes "
                        f"{CIFAR10_CLASSES}"
                    )
                self.targets = self._folder.targets
                return
        raise DatasetError(
            f"no CIFAR-10 {split} split found under {self.root}; expected {self.root}/{PICKLE_FOLDER}/ "
            f"(torchvision's python release), or {self.root}/{split}/<class>/*.jpg, "
            f"or {self.root}/cifar10/{split}/<class>/*.jpg (the extracted cifar10-jpeg.zip)"
        )

    def _read_pickles(self, pickle_dir: Path) -> None:
        arrays, targets = [], []
        self._batch_names: list[str] = []
        self._batch_starts: list[int] = []
        for name in SPLIT_FILES[self.split]:
            path = pickle_dir / name
            if not path.is_file():
                raise DatasetError(f"CIFAR-10 batch file {path} is missing; re-download the python release")
            batch = _read_batch(path)
            self._batch_names.append(str(path))
            self._batch_starts.append(len(targets))
            # A row is 3072 bytes: 1024 red values, then green, then blue, each a 32x32 row-major plane.
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets.extend(int(label) for label in batch[b"labels"])
        self._images = np.ascontiguousarray(np.concatenate(arrays).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        self.targets = targets
        meta_path = pickle_dir / "batches.meta"
        if meta_path.is_file():
            self.classes = [name.decode() for name in _read_batch(meta_path)[b"label_names"]]

    def load(self, index: int) -> tuple[Image.Image, int]:
        if self._folder is not None:
            return self._folder.load(index)
        return Image.fromarray(self._images[index]), self.targets[index]

    def describe(self, index: int) -> str:
        if self._folder is not None:
            return self._folder.describe(index)
        batch = bisect.bisect_right(self._batch_starts, index) - 1
        return f"{self._batch_names[batch]}[{index - self._batch_starts[batch]}]"


def _find_pickle_dir(root: Path) -> Path | None:
    for candidate in (root / PICKLE_FOLDER, root):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return candidate
    return None
