"""Datasets read from image files on disk: labelled ImageFolder layout and unlabelled folders.

Every dataset in `ssd.data` has the same small interface (see `ImageDataset`): `load(index)` returns a decoded
RGB PIL image and an int label, `describe(index)` names the sample for error messages. Augmentation and
seeding are separate (`SeededCropsDataset`), so a dataset never sees random state.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from ssd.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, is_image_file, load_rgb

UNLABELED = -1


class DatasetError(ValueError):
    """A data set that cannot be used as given (missing folder, wrong layout, no images)."""


class ImageDataset:
    """Interface shared by all data sets. Subclasses set `classes`, `targets` and implement `load`/`describe`.

    `classes` is empty and every target is -1 when the data set is unlabelled.
    """

    classes: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={len(self)}, classes={len(self.classes)})"


class FileListDataset(ImageDataset):
    """A fixed list of image files with one label each; the base of the folder data sets.

    An image above `max_pixels` pixels is unreadable (see `load_rgb`): skipped or fatal as data.on_bad_image says.
    """

    def __init__(self, paths: list[str], targets: list[int], classes: list[str],
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = paths
        self.targets = targets
        self.classes = classes
        self.max_pixels = max_pixels

    def load(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[index], self.max_pixels), self.targets[index]

    def describe(self, index: int) -> str:
        return self.paths[index]


class SkippedLinkWarning(UserWarning):
    """A symbolic link to a folder was not followed because it would read some images twice."""


def find_images(folder: str | os.PathLike, data_root: str | os.PathLike | None = None) -> list[str]:
    """All image files under `folder`, recursively, sorted by path; hidden files and folders are skipped.

    Sorting makes index -> file identical on every machine and process, which the seeded crops and the
    resumable sampler rely on. Symbolic links to folders are followed (data sets are often assembled so), but
    no folder is read twice: a link is not crossed (and is named in a SkippedLinkWarning) when it resolves to
    somewhere inside `data_root` (default: `folder`), which is read anyway and, for an ImageFolder, may be
    another class; to an ancestor of the folder holding it (a loop); or to a folder already read.
    """
    # Links into these trees are never crossed: every folder in them is read directly, from its parent.
    trees = (os.path.realpath(data_root if data_root is not None else folder), os.path.realpath(folder))
    visited: set[tuple[int, int]] = set()
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        visited.add(_identity(directory))
        # Pruning in place stops os.walk from entering hidden folders (.git, .ipynb_checkpoints, ...) and
        # links that would repeat images; sorting fixes which of two links to one folder is the one read.
        subdirectories[:] = sorted(
            name for name in subdirectories
            if not name.startswith(".") and _may_enter(os.path.join(directory, name), trees, visited)
        )
        found.extend(os.path.join(directory, name) for name in files if is_image_file(name))
    return sorted(found)


def _identity(path: str) -> tuple[int, int]:
    """(device, inode): one folder seen through different paths (links, bind mounts) has one identity."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _may_enter(path: str, trees: tuple[str, ...], visited: set[tuple[int, int]]) -> bool:
    """False, with a warning, for a link to a folder whose images would otherwise be read a second time."""
    if not os.path.islink(path):
        return True  # a plain sub-folder is reached only through its parent
    target = os.path.realpath(path)
    inside = [tree for tree in trees if _is_within(target, tree)]
    if inside:
        reason = f"inside {inside[0]}, whose folders are read directly"
    elif _is_within(os.path.realpath(os.path.dirname(path)), target):
        reason = "to an ancestor of the folder holding the link (a loop)"
    elif _identity(target) in visited:
        reason = "to a folder already read through another link"
    else:
        visited.add(_identity(target))  # now, not when entered: a sibling link to it is checked before that
        return True
    # stacklevel 4: past this function and find_images' generator, at whoever asked for the images.
    warnings.warn(f"not following symbolic link {path} -> {target}: it points {reason}", SkippedLinkWarning,
                  stacklevel=4)
    return False


def _check_folder(root: Path, layout: str) -> None:
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist; expected {layout}")
    if not root.is_dir():
        raise DatasetError(f"data folder {root} is not a folder; expected {layout}")


def _has_images_directly_under(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and is_image_file(entry.name) for entry in entries)


def _class_folders(root: Path) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))


class ImageFolderDataset(FileListDataset):
    """ImageNet layout `root/<class>/<image>`: one sub-folder per class, classes sorted by name.

    Images are found recursively inside each class folder. Files directly under `root`, non-image files and
    hidden files are ignored. Labels are the index of the class folder in sorted order (as torchvision's).
    """

    LAYOUT = "one sub-folder per class, root/<class>/<image>.jpg (the ImageNet 'train/' layout)"

    def __init__(self, root: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.root = Path(root)
        _check_folder(self.root, self.LAYOUT)
        classes = _class_folders(self.root)
        paths, targets = [], []
        for label, name in enumerate(classes):
            class_images = find_images(self.root / name, data_root=self.root)
            paths.extend(class_images)
            targets.extend([label] * len(class_images))
        if not paths:
            hint = ""
            if _has_images_directly_under(self.root):
                hint = " (images lie directly under the root: for unlabelled images use data.dataset=folder)"
            raise DatasetError(f"no images found under {self.root}{hint}; expected {self.LAYOUT}")
        super().__init__(paths, targets, classes, max_pixels)


class UnlabeledFolderDataset(FileListDataset):
    """Every image found recursively under `root`, in sorted path order, with label -1."""

    LAYOUT = "image files anywhere under the folder (sub-folders allowed, labels ignored)"

    def __init__(self, root: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.root = Path(root)
        _check_folder(self.root, self.LAYOUT)
        paths = find_images(self.root)
        if not paths:
            raise DatasetError(f"no images found under {self.root}; expected {self.LAYOUT}")
        super().__init__(paths, [UNLABELED] * len(paths), [], max_pixels)
