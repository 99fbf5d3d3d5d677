"""Data sets: scikit-learn digits, CIFAR-10 (shared zip and torchvision pickles), build_dataset."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ssd.data import CIFAR10_CLASSES, CIFAR10Dataset, DatasetError, DigitsDataset, build_dataset


def small_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


# ----------------------------------------------------------------------------------------------------------
# Digits


def test_digits_split_is_disjoint_complete_stratified_and_deterministic():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    train_ids, test_ids = set(train.source_indices.tolist()), set(test.source_indices.tolist())
    assert not train_ids & test_ids and train_ids | test_ids == set(range(1797))
    # Stratified: every class holds out about 20% of its images.
    for digit in range(10):
        held_out = test.targets.count(digit) / (test.targets.count(digit) + train.targets.count(digit))
        assert 0.15 < held_out < 0.25
    assert np.array_equal(DigitsDataset("test").source_indices, test.source_indices)
    assert not np.array_equal(DigitsDataset("test", seed=1).source_indices, test.source_indices)
    assert len(DigitsDataset("test", holdout_fraction=0.5)) in (898, 899)
    assert train.classes == [str(digit) for digit in range(10)]
    assert test.describe(0) == f"digits[{test.source_indices[0]}]"


def test_digits_images_are_upscaled_rgb():
    dataset = DigitsDataset("train", image_size=24)
    image, label = dataset.load(0)
    assert image.mode == "RGB" and image.size == (24, 24) and 0 <= label <= 9
    pixels = np.asarray(image)
    assert pixels.max() > 200 and pixels.min() < 30  # the 0..16 range was stretched to 0..255
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("validation")


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_from_the_shared_zip(cifar10_root):
    train = CIFAR10Dataset(cifar10_root, "train")
    test = CIFAR10Dataset(cifar10_root.parent, "test")  # root/cifar10/test, as the zip extracts
    assert len(train) == 50_000 and len(test) == 10_000
    assert train.classes == test.classes == CIFAR10_CLASSES
    assert np.bincount(train.targets).tolist() == [5000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    image, label = train.load(25_000)
    assert image.size == (32, 32) and image.mode == "RGB" and label == 5
    assert "dog" in train.describe(25_000)


def write_torchvision_cifar(root: Path, images_per_batch: int = 3) -> Path:
    """A tiny copy of torchvision's python release: pickled dicts of uint8 rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]
    for batch_number, name in enumerate(names):
        count = images_per_batch if name != "test_batch" else 2
        # (count, 3, 32, 32): channel planes as in the release; image i of batch n is filled with n*10 + i.
        planes = np.zeros((count, 3, 32, 32), dtype=np.uint8)
        for image in range(count):
            planes[image, 0] = batch_number * 10 + image  # red
            planes[image, 2, 0, 1] = 255  # blue at row 0, column 1
        batch = {
            b"data": planes.reshape(count, 3072),
            b"labels": [(batch_number + i) % 10 for i in range(count)],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [name.encode() for name in CIFAR10_CLASSES]}, file, protocol=2)
    return folder


def test_cifar10_torchvision_pickle_format(tmp_path):
    folder = write_torchvision_cifar(tmp_path)
    train = CIFAR10Dataset(tmp_path, "train")
    test = CIFAR10Dataset(folder, "test")  # root may also be cifar-10-batches-py itself
    assert len(train) == 15 and len(test) == 2 and train.classes == CIFAR10_CLASSES
    image, label = train.load(4)  # batch 2 (number 1), image 1
    pixels = np.asarray(image)  # (32, 32, 3)
    assert image.mode == "RGB" and pixels.shape == (32, 32, 3)
    assert pixels[5, 5].tolist() == [11, 0, 0] and pixels[0, 1].tolist() == [11, 0, 255]
    assert label == 2
    assert train.describe(4).endswith("data_batch_2[1]")
    assert test.targets == [5, 6]


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder = write_torchvision_cifar(tmp_path)

    class RunsCode:
        def __reduce__(self):
            return (print, ("this would have run arbitrary code",))

    with open(folder / "test_batch", "wb") as file:
        pickle.dump({b"data": RunsCode(), b"labels": []}, file, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        CIFAR10Dataset(tmp_path, "test")


def test_cifar10_errors_name_the_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py") as caught:
        CIFAR10Dataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(caught.value)
    folder = write_torchvision_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        CIFAR10Dataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        CIFAR10Dataset(tmp_path, "val")


# ----------------------------------------------------------------------------------------------------------
# build_dataset


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str = ""
    split: str = "train"
    holdout_fraction: float = 0.2


def test_build_dataset_from_dataclass_and_omegaconf(tmp_path, tiny_image_folder):
    assert len(build_dataset(DataConfig())) == 1437
    assert len(build_dataset(DataConfig(), split="test")) == 360
    assert len(build_dataset(OmegaConf.structured(DataConfig(holdout_fraction=0.5)), "test")) in (898, 899)

    # imagefolder: root/<split> when it exists, else root itself.
    assert build_dataset(DataConfig("imagefolder", str(tiny_image_folder))).classes == [
        "blue_checks",
        "red_stripes",
    ]
    split_root = tmp_path / "imagenet_like"
    (split_root / "val").mkdir(parents=True)
    tiny_image_folder.rename(split_root / "train")
    (split_root / "val" / "cat").mkdir()
    small_png(split_root / "val" / "cat" / "1.png")
    config = OmegaConf.structured(DataConfig("imagefolder", str(split_root)))
    assert len(build_dataset(config)) == 12 and build_dataset(config, "val").classes == ["cat"]
    with pytest.raises(DatasetError, match="no test/ folder"):
        build_dataset(config, "test")
    assert len(build_dataset(DataConfig("folder", str(split_root)), "val")) == 1


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="digits, cifar10, imagefolder, folder"):
        build_dataset(DataConfig("imagenet", str(tmp_path)))
    with pytest.raises(DatasetError, match="data.root"):
        build_dataset(DataConfig("cifar10", ""))
    with pytest.raises(DatasetError, match=str(tmp_path / "absent")):
        build_dataset(DataConfig("imagefolder", str(tmp_path / "absent")))


def test_build_dataset_cifar10(cifar10_root):
    config = DataConfig("cifar10", str(cifar10_root))
    assert len(build_dataset(config)) == 50_000 and len(build_dataset(config, "test")) == 10_000
