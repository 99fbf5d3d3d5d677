"""Image loading on real files: odd image modes, broken files, folder data sets, the bad-image policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd.data import (
    BadImageWarning,
    DatasetError,
    ImageFolderDataset,
    SeededCropsDataset,
    UnlabeledFolderDataset,
    UnreadableImageError,
    is_image_file,
    load_rgb,
)

# ----------------------------------------------------------------------------------------------------------
# Writers of real image files in unusual modes, and of broken files


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 random colours."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_truncated_jpeg(path: Path) -> Path:
    # Noise does not compress, so the cut falls in the pixel data: the header parses, decoding fails.
    Image.fromarray(noise(128, 128)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def write_palette_png_with_transparency(path: Path) -> Path:
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)  # index 0 black (transparent), index 1 red
    image.paste(0, (0, 0, 5, 10))  # left half transparent
    image.save(path, transparency=0)
    return path


def write_rgba_png(path: Path) -> Path:
    pixels = np.zeros((10, 10, 4), dtype=np.uint8)
    pixels[:, :5] = (0, 0, 0, 0)  # fully transparent black: must show the white background
    pixels[:, 5:] = (0, 0, 200, 255)  # opaque blue
    Image.fromarray(pixels).save(path)
    return path


def write_gray16_png(path: Path) -> Path:
    pixels = np.zeros((10, 10), dtype=np.uint16)
    pixels[:, 5:] = 65535
    pixels[:, :5] = 32896  # 128 * 257
    Image.fromarray(pixels).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# load_rgb


def test_odd_modes_become_rgb_with_the_documented_pixel_values(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    palette = write_palette_png_with_transparency(tmp_path / "palette.png")
    rgba = write_rgba_png(tmp_path / "rgba.png")
    gray16 = write_gray16_png(tmp_path / "gray16.png")
    with Image.open(gray16) as written:
        assert written.mode.startswith("I")  # the file really is 16-bit

    for path in (cmyk, palette, rgba, gray16):
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (10, 10), path

    red = load_rgb(cmyk).getpixel((5, 5))
    assert red[0] > 200 and red[1] < 50 and red[2] < 50
    # Transparent pixels are composited on white, opaque ones keep their colour.
    assert load_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(palette).getpixel((9, 0)) == (200, 30, 10)
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(rgba).getpixel((9, 0)) == (0, 0, 200)
    # 16-bit values are scaled to 8 bits, not clipped at 255.
    assert load_rgb(gray16).getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(gray16).getpixel((9, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "I", "F"])
def test_other_pil_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"image_{mode}.tiff"
    Image.fromarray(noise(12, 12)).convert(mode).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (12, 12)


@pytest.mark.parametrize(
    "name, write",
    [
        ("truncated.jpg", write_truncated_jpeg),
        ("text.jpg", lambda path: path.write_text("this is not a JPEG")),
        ("empty.png", lambda path: path.write_bytes(b"")),
        ("missing.jpg", lambda path: None),
    ],
)
def test_unreadable_files_raise_an_error_naming_the_file(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(UnreadableImageError) as caught:
        load_rgb(path)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path) and caught.value.reason


def test_image_extensions_are_case_insensitive_and_hidden_files_are_not_images():
    assert is_image_file("a/B.JPG") and is_image_file("x.Tiff") and is_image_file("y.webp")
    assert (
        not is_image_file("notes.txt") and not is_image_file("meta.json") and not is_image_file(".hidden.jpg")
    )


# ----------------------------------------------------------------------------------------------------------
# Folder data sets


def test_image_folder_finds_images_recursively_and_ignores_other_files(tiny_image_folder):
    nested = tiny_image_folder / "red_stripes" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.fromarray(noise(40, 40)).save(nested / "extra.PNG")
    (tiny_image_folder / "red_stripes" / "notes.txt").write_text("not an image")
    (tiny_image_folder / "blue_checks" / "labels.json").write_text("{}")
    Image.fromarray(noise(8, 8)).save(tiny_image_folder / "blue_checks" / ".hidden.jpg")
    (tiny_image_folder / ".cache").mkdir()  # a hidden folder is not a class
    Image.fromarray(noise(8, 8)).save(tiny_image_folder / ".cache" / "thumb.jpg")

    dataset = ImageFolderDataset(tiny_image_folder)
    assert dataset.classes == ["blue_checks", "red_stripes"]
    assert len(dataset) == 13
    assert dataset.targets == [0] * 6 + [1] * 7
    assert dataset.describe(12) == str(nested / "extra.PNG")
    assert [Path(path).name for path in dataset.paths[:6]] == [
        f"{n:02d}.{'jpg' if n % 2 == 0 else 'png'}" for n in range(6)
    ]
    for index in (0, 1, 12):
        image, label = dataset.load(index)
        assert image.mode == "RGB" and image.size == (40, 40) and label == dataset.targets[index]
    # Same files, same order: indices mean the same thing in every process.
    assert ImageFolderDataset(tiny_image_folder).paths == dataset.paths


def test_unlabeled_folder_has_every_image_and_no_labels(tiny_image_folder):
    dataset = UnlabeledFolderDataset(tiny_image_folder)
    assert len(dataset) == 12 and dataset.classes == [] and set(dataset.targets) == {-1}
    image, label = dataset.load(3)
    assert image.mode == "RGB" and label == -1


@pytest.mark.parametrize("dataset_class", [ImageFolderDataset, UnlabeledFolderDataset])
def test_missing_or_empty_root_errors_name_the_path_and_the_layout(tmp_path, dataset_class):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DatasetError, match="expected") as caught:
        dataset_class(missing)
    assert str(missing) in str(caught.value) and isinstance(caught.value, ValueError)

    empty = tmp_path / "empty"
    (empty / "some_class").mkdir(parents=True)
    (empty / "some_class" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no images found under") as caught:
        dataset_class(empty)
    assert str(empty) in str(caught.value)


def test_image_folder_with_images_directly_under_root_suggests_the_unlabeled_dataset(tmp_path):
    Image.fromarray(noise(8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="data.dataset=folder"):
        ImageFolderDataset(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Unreadable images inside a training data set


def identity_transform(image):
    return [np.asarray(image)]


@pytest.fixture
def folder_with_broken_images(tiny_image_folder):
    """tiny_image_folder, plus broken files that sort between the good ones of class red_stripes."""
    broken = tiny_image_folder / "red_stripes"
    write_truncated_jpeg(broken / "00_truncated.jpg")
    (broken / "00_zz_text.jpg").write_text("not a JPEG at all")
    (broken / "01_empty.png").write_bytes(b"")
    return tiny_image_folder


def test_skip_mode_warns_with_the_file_name_and_substitutes_the_next_readable_image(
    folder_with_broken_images,
):
    dataset = ImageFolderDataset(folder_with_broken_images)
    names = [Path(path).name for path in dataset.paths]
    first_bad = names.index("00_truncated.jpg", 6)
    assert names[first_bad : first_bad + 4] == [
        "00_truncated.jpg",
        "00_zz_text.jpg",
        "01.png",
        "01_empty.png",
    ]
    crops = SeededCropsDataset(dataset, identity_transform, seed=0, on_bad_image="skip")

    with pytest.warns(BadImageWarning) as records:
        sample = crops[(0, first_bad)]
    messages = [str(record.message) for record in records]
    assert len(messages) == 2
    assert "00_truncated.jpg" in messages[0] and "00_zz_text.jpg" in messages[1]
    assert "skipped so far in this process" in messages[1]
    assert sample["index"] == first_bad + 2  # the next readable image, 01.png
    assert sample["label"] == 1
    assert np.array_equal(sample["crops"][0], np.asarray(dataset.load(first_bad + 2)[0]))


def test_skip_mode_wraps_around_and_fails_when_nothing_is_readable(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_text("garbage")
    crops = SeededCropsDataset(UnlabeledFolderDataset(tmp_path), identity_transform, on_bad_image="skip")
    with pytest.warns(BadImageWarning), pytest.raises(RuntimeError, match="all 2 images"):
        crops[(0, 1)]


def test_fail_mode_raises_naming_the_file_and_how_to_skip(folder_with_broken_images):
    dataset = ImageFolderDataset(folder_with_broken_images)
    bad_index = [Path(path).name for path in dataset.paths].index("01_empty.png")
    crops = SeededCropsDataset(dataset, identity_transform, on_bad_image="fail")
    with pytest.raises(UnreadableImageError) as caught:
        crops[(0, bad_index)]
    assert "01_empty.png" in str(caught.value) and "data.on_bad_image=skip" in str(caught.value)
    with pytest.raises(ValueError, match="on_bad_image"):
        SeededCropsDataset(dataset, identity_transform, on_bad_image="ignore")
