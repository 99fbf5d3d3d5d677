"""Images/s of one worker process for DINO's multi-crop (2 x 224 + 8 x 96) from JPEG files: ssd versus the
official `DataAugmentationDINO`, interleaved in one run on the same files.

    python benchmarks/data_throughput.py --official /path/to/facebookresearch/dino   # ssd and official side by side
    python benchmarks/data_throughput.py                                             # ssd alone
    python benchmarks/data_throughput.py --images /data/imagenet/train/n01440764     # your own JPEGs

One DataLoader worker is one process on one core, so everything runs on one thread (torch.set_num_threads(1)):
images/s here is images/s per worker. Each image is decoded and augmented as a training run does it: ssd through
its folder data set (`load_rgb`) and `SeededCropsDataset` (per-sample seeding) with `MultiCropAugmentation`; the
official code through torchvision's ImageFolder loader (open, convert("RGB")) and
`main_dino.DataAugmentationDINO((0.4, 1), (0.05, 0.4), 8)`, imported from the checkout given by --official (nothing
of it is copied here). The pipelines alternate round by round, so a load change on a shared machine hits both; the
table gives the median round of each.

ssd is timed twice: with the colour steps in the worker (crops.photometric_on=loader, DINO's way) and with them
left to the training device (crops.photometric_on=device, the default on a GPU): the worker then crops, draws the
colour parameters and sends uint8 pixels. What that moves to the device is timed too, on this CPU thread, per image
in batches of the round's images (`apply_photometric`; on a GPU it runs there, batched).

Without --images, a folder of seeded synthetic JPEGs is made: ImageNet-like sizes (mostly 500 x 375 / 375 x 500 /
500 x 333) holding smooth random scenes with 1/f-like detail at every scale, saved at quality 90 as ImageNet's are;
--size 2048x1536 makes camera-sized photos instead, where decoding costs more than the crops.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from knn_throughput import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when this file runs)

from ssd.data import MultiCropAugmentation, SeededCropsDataset, find_images  # noqa: E402
from ssd.data.deferred_photometric import apply_photometric  # noqa: E402
from ssd.data.folders import UNLABELED, FileListDataset  # noqa: E402
from ssd.data.seeded import collate_crops  # noqa: E402

IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (333, 500))


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random scene: noise upscaled from several octaves, amplitude falling with frequency (natural
    images have a ~1/f spectrum), so JPEG coding and decoding cost about what a photo's do."""
    scene = np.zeros((height, width, 3), dtype=np.float32)
    for octave in range(1, 8):
        cells = 2**octave
        noise = rng.normal(0, 1, (cells, max(2, cells * width // height), 3)).astype(np.float32)
        layer = Image.fromarray(np.uint8(np.clip(noise * 40 + 128, 0, 255))).resize((width, height), Image.BICUBIC)
        scene += (np.asarray(layer, dtype=np.float32) - 128) / octave
    scene = scene * 1.2 + rng.uniform(60, 190, 3)
    return Image.fromarray(np.uint8(np.clip(scene, 0, 255)))


def make_images(folder: Path, count: int, seed: int, size: tuple[int, int] | None = None) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = size or IMAGENET_LIKE_SIZES[index % len(IMAGENET_LIKE_SIZES)]
        synthetic_image(rng, width, height).save(folder / f"{index:05d}.jpg", quality=90)
    return find_images(folder)


def official_augmentation(checkout: str):
    """`DataAugmentationDINO` with DINO's default arguments, imported from an official checkout."""
    if not (Path(checkout) / "main_dino.py").is_file():
        raise SystemExit(f"--official {checkout}: no main_dino.py there; give the folder of a clone of "
                         "https://github.com/facebookresearch/dino")
    sys.path.insert(0, str(Path(checkout).resolve()))
    import main_dino

    return main_dino.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 8)


def official_loader(path: str) -> Image.Image:
    """torchvision.datasets.folder.pil_loader, which DINO's ImageFolder uses."""
    with open(path, "rb") as file:
        return Image.open(file).convert("RGB")


def ssd_samples(paths: list[str], photometric_on: str) -> SeededCropsDataset:
    """What a training run's DataLoader worker runs per image: the folder data set's loader and the seeded
    multi-crop."""
    dataset = FileListDataset(paths, [UNLABELED] * len(paths), [])
    return SeededCropsDataset(dataset, MultiCropAugmentation(photometric_on=photometric_on))


def ssd_pipeline(paths: list[str], photometric_on: str = "loader"):
    samples = ssd_samples(paths, photometric_on)

    def run(index: int, path: str) -> list[torch.Tensor]:
        return samples[(0, index)]["crops"]
    return run


def device_part_ms(paths: list[str], rounds: int) -> float:
    """ms per image of the colour steps left to the device, run here (one thread), on batches of all `paths`."""
    samples = ssd_samples(paths, "device")
    batch = collate_crops([samples[(0, index)] for index in range(len(paths))])
    apply_photometric(batch["crops"], batch["photometric"])  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        apply_photometric(batch["crops"], batch["photometric"])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(paths)


def crop_bytes(crops: list[torch.Tensor]) -> int:
    return sum(crop.numel() * crop.element_size() for crop in crops)


def official_pipeline(augmentation):
    def run(index: int, path: str) -> list[torch.Tensor]:
        return augmentation(official_loader(path))
    return run


def images_per_second(pipeline, paths: list[str]) -> float:
    start = time.perf_counter()
    for index, path in enumerate(paths):
        crops = pipeline(index, path)
    assert len(crops) == 10
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--images", help="folder of images to read (default: make --count synthetic JPEGs)")
    parser.add_argument("--count", type=int, default=48, help="synthetic images to make (default 48)")
    parser.add_argument("--size", help="WIDTHxHEIGHT of every synthetic image, e.g. 2048x1536 for camera photos "
                                       "(default: a mix of ImageNet sizes)")
    parser.add_argument("--limit", type=int, default=48, help="images per round, from the folder (default 48)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline (default 5)")
    parser.add_argument("--official", help="folder of a facebookresearch/dino checkout (main_dino.py); "
                                           "without it ssd is timed alone")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="ssd-data-throughput-") as scratch:
        if args.images:
            paths = find_images(args.images)
            if not paths:
                raise SystemExit(f"--images {args.images}: no image files found there")
            source = args.images
        else:
            size = tuple(int(side) for side in args.size.lower().split("x")) if args.size else None
            paths = make_images(Path(scratch), args.count, args.seed, size)
            source = (f"{args.count} synthetic JPEGs (seed {args.seed}, quality 90, "
                      f"{args.size or 'ImageNet-like sizes'})")
        paths = paths[: args.limit]
        pipelines = {"ssd, colour steps in the worker": ssd_pipeline(paths),
                     "ssd, colour steps on the device (worker part)": ssd_pipeline(paths, "device")}
        if args.official:
            pipelines["official DataAugmentationDINO"] = official_pipeline(official_augmentation(args.official))
        mean_pixels = statistics.mean(w * h for w, h in (Image.open(p).size for p in paths))

        print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
        print(f"cpu: {cpu_name()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
              f"load average at start {os.getloadavg()[0]:.1f}")
        print(f"python {platform.python_version()}, torch {torch.__version__}, "
              f"pillow {Image.__version__}, torchvision {__import__('torchvision').__version__}")
        print(f"images: {len(paths)} from {source}, mean {mean_pixels / 1e3:.0f} kpixels; "
              f"crops 2 x 224 + 8 x 96; {args.rounds} rounds, pipelines alternating")
        if not args.official:
            print("official DataAugmentationDINO: not timed (no --official checkout given)")

        for pipeline in pipelines.values():  # warm-up: first-call costs (imports, allocations) left out
            images_per_second(pipeline, paths[:4])
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        for round_index in range(args.rounds):
            names = list(pipelines) if round_index % 2 == 0 else list(reversed(pipelines))
            for name in names:
                rates[name].append(images_per_second(pipelines[name], paths))
        device_ms = device_part_ms(paths, args.rounds)
        sizes = {name: crop_bytes(pipeline(0, paths[0])) for name, pipeline in pipelines.items()}

    print("\n| pipeline | images/s per worker (median) | min - max over rounds | ms / image | bytes / image sent |")
    print("|---|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f} - {max(values):.1f} | {1000 / median:.1f} | "
              f"{sizes[name] / 1e6:.2f} MB |")
    print(f"\ncolour steps moved to the device, run here on one CPU thread in batches of {len(paths)} images: "
          f"{device_ms:.1f} ms / image")
    if args.official:
        official = statistics.median(rates["official DataAugmentationDINO"])
        for name, values in rates.items():
            if not name.startswith("official"):
                print(f"{name} / official: {statistics.median(values) / official:.2f}x images/s per worker")


if __name__ == "__main__":
    main()
