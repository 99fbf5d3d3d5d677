"""Bad input in image folders, on real files: symbolic-link loops and decompression bombs."""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd.data import (
    BadImageWarning,
    ImageFolderDataset,
    SeededCropsDataset,
    SkippedLinkWarning,
    UnlabeledFolderDataset,
    UnreadableImageError,
    build_dataset,
    load_rgb,
)

# ----------------------------------------------------------------------------------------------------------
# Symbolic links in image folders


def write_image(path: Path, seed: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def two_classes(tmp_path) -> Path:
    """root/a: 2 images (one in a sub-folder), root/b: 3 images."""
    root = tmp_path / "root"
    write_image(root / "a" / "0.png", 0)
    write_image(root / "a" / "deeper" / "1.png", 1)
    for number in range(3):
        write_image(root / "b" / f"{number}.png", 10 + number)
    return root


def snapshot(dataset) -> list[tuple[str, int]]:
    return list(zip(dataset.paths, dataset.targets))


def load_warning_free(dataset_class, root: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return dataset_class(root)


@pytest.mark.parametrize("link, target", [
    ("a/loop", ".."),  # back to the data root
    ("a/deeper/loop", "../"),  # to its own parent (the class folder)
    ("a/deeper/self", "."),  # to its own folder
    ("a/into_b", "../b"),  # from class a into class b
])
@pytest.mark.parametrize("dataset_class", [ImageFolderDataset, UnlabeledFolderDataset])
def test_links_that_would_repeat_images_are_not_followed(two_classes, link, target, dataset_class):
    expected = snapshot(load_warning_free(dataset_class, two_classes))
    (two_classes / link).symlink_to(target, target_is_directory=True)
    with pytest.warns(SkippedLinkWarning) as caught:
        dataset = dataset_class(two_classes)
    assert snapshot(dataset) == expected  # same files, same order, same labels
    messages = [str(warning.message) for warning in caught if warning.category is SkippedLinkWarning]
    assert len(messages) == 1, messages
    resolved = os.path.realpath(two_classes / link)
    assert str(two_classes / link) in messages[0] and resolved in messages[0]


def test_loop_to_the_absolute_root_keeps_counts_and_labels(two_classes):
    (two_classes / "b" / "root").symlink_to(two_classes.resolve(), target_is_directory=True)
    with pytest.warns(SkippedLinkWarning, match="not following symbolic link .*b/root"):
        dataset = ImageFolderDataset(two_classes)
    assert len(dataset) == 5 and dataset.targets == [0, 0, 1, 1, 1]
    assert dataset.classes == ["a", "b"]


def test_loop_outside_the_data_root_is_entered_once(tmp_path, two_classes):
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "x" / "2.png", 2)
    (elsewhere / "x" / "up").symlink_to(elsewhere, target_is_directory=True)  # ancestor of the linked folder
    (two_classes / "a" / "extra").symlink_to(elsewhere / "x", target_is_directory=True)
    (two_classes / "a" / "extra_again").symlink_to(elsewhere / "x", target_is_directory=True)
    with pytest.warns(SkippedLinkWarning) as caught:
        dataset = ImageFolderDataset(two_classes)
    assert dataset.targets == [0, 0, 0, 1, 1, 1]
    assert [p for p in dataset.paths if "extra" in p] == [str(two_classes / "a" / "extra" / "2.png")]
    messages = sorted(str(warning.message) for warning in caught)
    assert len(messages) == 2
    assert "extra/up" in messages[0] and "ancestor" in messages[0]
    assert "extra_again" in messages[1] and "already read" in messages[1]


def test_a_symlinked_class_folder_and_linked_sub_folders_are_still_used(tmp_path, two_classes):
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "c" / "0.png", 20)
    write_image(elsewhere / "more" / "1.png", 21)
    (two_classes / "c").symlink_to(elsewhere / "c", target_is_directory=True)
    (two_classes / "b" / "more").symlink_to(elsewhere / "more", target_is_directory=True)
    dataset = load_warning_free(ImageFolderDataset, two_classes)
    assert dataset.classes == ["a", "b", "c"]
    assert dataset.targets == [0, 0, 1, 1, 1, 1, 2]
    assert str(two_classes / "b" / "more" / "1.png") in dataset.paths
    assert dataset.paths == sorted(dataset.paths)


# ----------------------------------------------------------------------------------------------------------
# Decompression bombs


def write_bomb(path: Path, side: int = 13000) -> Path:
    """A 1-bit PNG of side x side black pixels: about 20 KB on disk, 169 megapixels when decoded."""
    Image.new("1", (side, side)).save(path)
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's own note, above 89 megapixels
        with pytest.raises(UnreadableImageError) as caught:
            load_rgb(bomb)  # the default limit, 50 megapixels
    message = str(caught.value)
    assert str(bomb) in message and "13000 x 13000 = 169000000 pixels" in message
    assert "above the limit of 50000000 (data.max_image_pixels" in message and "raise it" in message


def test_pixel_limit_reaches_the_folder_data_sets(tmp_path):
    root = tmp_path / "data" / "train"
    write_image(root / "small" / "ok.png", 0, size=50)  # 2500 pixels
    write_image(root / "small" / "big.png", 1, size=100)  # 10000 pixels
    cfg = types.SimpleNamespace(dataset="imagefolder", root=str(tmp_path / "data"), max_image_pixels=5000)
    dataset = build_dataset(cfg, "train")
    assert dataset.load(dataset.paths.index(str(root / "small" / "ok.png")))[0].size == (50, 50)
    with pytest.raises(UnreadableImageError, match=r"big\.png.*100 x 100 = 10000 pixels, above the limit of 5000"):
        dataset.load(dataset.paths.index(str(root / "small" / "big.png")))
    assert build_dataset(types.SimpleNamespace(dataset="folder", root=str(root)), "train").max_pixels == 50_000_000
    assert UnlabeledFolderDataset(root, max_pixels=100).max_pixels == 100


def test_seeded_crops_skip_an_oversized_image_with_a_warning(tmp_path):
    write_image(tmp_path / "0_big.png", 0, size=100)
    write_image(tmp_path / "1_ok.png", 1, size=50)
    dataset = UnlabeledFolderDataset(tmp_path, max_pixels=5000)
    crops = SeededCropsDataset(dataset, lambda image: [image], on_bad_image="skip")
    with pytest.warns(BadImageWarning, match=r"skipping unreadable image .*0_big\.png .*10000 pixels"):
        sample = crops[(0, 0)]
    assert sample["index"] == 1 and sample["crops"][0].size == (50, 50)
    with pytest.raises(UnreadableImageError, match=r"0_big\.png.*data.on_bad_image=skip"):
        SeededCropsDataset(dataset, lambda image: [image], on_bad_image="fail")[(0, 0)]
