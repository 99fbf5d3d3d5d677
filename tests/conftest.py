"""Shared pytest fixtures: the real CIFAR-10 copy beside the checkout, a tiny ImageFolder of real files."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The real SLURM cluster fixture (started on demand by the tests that need it).
pytest_plugins = ["tests.slurm_cluster"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# A whole-recipe (`long`) test may take twice its quiet-machine time when the cores are shared; the suite's
# 30-minute limit (pyproject.toml) is for everything else.
LONG_TEST_TIMEOUT_S = 3 * 3600


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("long") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(LONG_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    """A tiny DINO run (tests/tiny.py, 3 steps): the frozen teacher of the distillation tests."""
    from tests.tiny import run_training, tiny_overrides

    root = tmp_path_factory.mktemp("teacher")
    run_training(tiny_overrides(root, "teacher", "train.max_steps=3"))
    return root / "teacher"


CIFAR10_ZIP = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
ZIP_TOP_FOLDER = "cifar10"  # the zip holds cifar10/train/<class>/*.jpg and cifar10/test/...


def data_cache_dir() -> Path:
    return Path(os.environ.get("SSD_DATA_CACHE") or Path.home() / ".cache" / "ssd-data").expanduser()


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """Folder holding CIFAR-10's train/ and test/ ImageFolder copies, extracted once from the shared zip."""
    cache = data_cache_dir()
    target = cache / ZIP_TOP_FOLDER
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    if not CIFAR10_ZIP.is_file():
        pytest.skip(f"CIFAR-10 zip not found at {CIFAR10_ZIP} (expected ../shared/data/ beside the checkout)")
    cache.mkdir(parents=True, exist_ok=True)
    # Extract beside the target and rename: an interrupted extraction or a concurrent test session never
    # leaves a half-filled folder under the final name.
    staging = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=cache))
    try:
        with zipfile.ZipFile(CIFAR10_ZIP) as archive:
            archive.extractall(staging)
        try:
            os.rename(staging / ZIP_TOP_FOLDER, target)
        except OSError:
            if not (target / "train").is_dir():  # lost a race to another session: its copy is complete
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture
def torch_single_thread():
    """One intra-op thread for the test: on tiny tensors more threads only add overhead, and on a busy 2-core
    machine they wait on each other (a 30x slowdown was seen). DataLoader workers already use one each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pattern(colour: tuple[int, int, int], period: int, checks: bool, size: int = 40) -> np.ndarray:
    """(size, size, 3) uint8: horizontal stripes or a checkerboard of `colour` on a dark background."""
    rows, columns = np.mgrid[0:size, 0:size]  # (size, size) each
    on = (rows // period + (columns // period if checks else 0)) % 2 == 0
    image = np.full((size, size, 3), 20, dtype=np.uint8)
    image[on] = colour
    return image


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """ImageFolder root with classes `blue_checks` and `red_stripes`, 6 real 40x40 images each (JPEG and PNG).

    Every image differs (colour shade and pattern period), so tests can tell images apart.
    """
    root = tmp_path / "tiny_image_folder"
    for class_name, checks in [("blue_checks", True), ("red_stripes", False)]:
        (root / class_name).mkdir(parents=True)
        for number in range(6):
            shade = 120 + 20 * number
            colour = (0, 40, shade) if checks else (shade, 30, 10)
            extension = "jpg" if number % 2 == 0 else "png"
            image = Image.fromarray(_pattern(colour, period=2 + number, checks=checks))
            image.save(root / class_name / f"{number:02d}.{extension}")
    return root


def natural_scene(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Random phases under a 1/f amplitude spectrum, the spectrum of natural photos: detail at every scale, so
    how much a crop is blurred shows in its gradients."""
    frequency_y, frequency_x = np.meshgrid(np.fft.fftfreq(height), np.fft.rfftfreq(width), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(frequency_y, frequency_x), 1.0 / max(height, width))
    channels = [np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), s=(height, width))
                for _ in range(3)]
    scene = np.stack(channels, axis=-1)
    scene = (scene - scene.mean()) / scene.std() * 50 + rng.uniform(90, 160)
    return Image.fromarray(np.uint8(np.clip(scene, 0, 255)))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """24 JPEG natural scenes (240 x 320 / 320 x 240, quality 90) as an UnlabeledFolderDataset."""
    from ssd.data.folders import UnlabeledFolderDataset

    folder = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    for index in range(24):
        height, width = (240, 320) if index % 2 else (320, 240)
        natural_scene(rng, height, width).save(folder / f"{index:03d}.jpg", quality=90)
    return UnlabeledFolderDataset(folder)
