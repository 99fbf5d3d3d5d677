"""DINO multi-crop: shapes, the configured and observed per-view probabilities, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ssd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DigitsDataset,
    MultiCropAugmentation,
    SeededCropsDataset,
    blur_kernel_size,
    collate_crops,
    eval_transform,
    mix_seeds,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def colour_noise(size: int = 48, seed: int = 0) -> Image.Image:
    """Random colours in 4x4 blocks: every crop is colourful and not constant."""
    blocks = np.random.default_rng(seed).integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))


def white_with_lines(size: int = 48) -> Image.Image:
    """White with a 2-pixel red line every 16 rows. Bright nearly everywhere, so without solarization a
    crop's max stays >= 128/255 even after the darkest colour jitter and strongest blur; with it < 128/255."""
    pixels = np.full((size, size, 3), 255, dtype=np.uint8)
    for row in range(0, size, 16):
        pixels[row : row + 2] = (200, 30, 10)
    return Image.fromarray(pixels)


def unnormalize(crop: torch.Tensor) -> torch.Tensor:
    return crop * STD + MEAN  # (3, H, W), back in 0..1


def pipeline_steps(pipeline: v2.Compose, kind: type) -> list:
    """Transforms of type `kind` in a view pipeline, looking inside RandomApply; (transform, probability)."""
    found = []
    for step in pipeline.transforms:
        if isinstance(step, v2.RandomApply):
            found += [(inner, step.p) for inner in step.transforms if isinstance(inner, kind)]
        elif isinstance(step, kind):
            found.append((step, getattr(step, "p", 1.0)))
    return found


# ----------------------------------------------------------------------------------------------------------
# Shapes


def test_default_settings_give_two_global_and_eight_local_crops():
    crops = MultiCropAugmentation()(colour_noise(64))
    assert len(crops) == 10
    assert [tuple(crop.shape) for crop in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    for crop in crops:
        assert type(crop) is torch.Tensor and crop.dtype == torch.float32 and torch.isfinite(crop).all()


@pytest.mark.parametrize("global_size, local_number, local_size", [(32, 4, 16), (40, 0, 16), (24, 1, 24)])
def test_custom_settings(global_size, local_number, local_size):
    augmentation = MultiCropAugmentation(
        global_size=global_size, local_number=local_number, local_size=local_size
    )
    crops = augmentation(colour_noise())
    assert augmentation.num_views == len(crops) == 2 + local_number
    assert [tuple(crop.shape) for crop in crops] == [(3, global_size, global_size)] * 2 + [
        (3, local_size, local_size)
    ] * local_number


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_crop():
    assert [blur_kernel_size(size) for size in (224, 96, 32, 8)] == [23, 9, 3, 3]
    assert all(blur_kernel_size(size) % 2 == 1 for size in range(1, 600))


# ----------------------------------------------------------------------------------------------------------
# Per-view probabilities: as configured ...


@pytest.mark.parametrize(
    "view, blur_p, solarize_p",
    [("global_transform_1", 1.0, None), ("global_transform_2", 0.1, 0.2), ("local_transform", 0.5, None)],
)
def test_configured_recipe_of_each_view(view, blur_p, solarize_p):
    augmentation = MultiCropAugmentation(global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))
    pipeline = getattr(augmentation, view)
    size, scale = (96, (0.05, 0.4)) if view == "local_transform" else (224, (0.4, 1.0))

    [(crop, _)] = pipeline_steps(pipeline, v2.RandomResizedCrop)
    assert crop.size == (size, size) and crop.scale == scale
    assert crop.interpolation == v2.InterpolationMode.BICUBIC
    assert [p for _, p in pipeline_steps(pipeline, v2.RandomHorizontalFlip)] == [0.5]
    [(jitter, jitter_p)] = pipeline_steps(pipeline, v2.ColorJitter)
    assert jitter_p == 0.8
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))
    assert [p for _, p in pipeline_steps(pipeline, v2.RandomGrayscale)] == [0.2]
    [(blur, observed_blur_p)] = pipeline_steps(pipeline, v2.GaussianBlur)
    assert observed_blur_p == blur_p
    assert (
        blur.sigma == pytest.approx([0.1, 2.0]) and tuple(blur.kernel_size) == (blur_kernel_size(size),) * 2
    )
    solarize = pipeline_steps(pipeline, v2.RandomSolarize)
    assert [p for _, p in solarize] == ([solarize_p] if solarize_p else [])
    assert all(step.threshold == 128 for step, _ in solarize)


# ... and as observed.


def test_observed_rates_of_blur_solarize_and_grayscale(torch_single_thread):
    torch.manual_seed(0)
    augmentation = MultiCropAugmentation(global_size=24, local_size=12)
    views = {
        "global_transform_1": (1.0, 0.0),  # expected blur rate, solarize rate
        "global_transform_2": (0.1, 0.2),
        "local_transform": (0.5, 0.0),
    }
    calls = 200
    colourful, bright = colour_noise(32), white_with_lines(32)
    for name, (blur_rate, solarize_rate) in views.items():
        pipeline = getattr(augmentation, name)
        # Blur runs are counted by a forward hook on the pipeline's real GaussianBlur module.
        [(blur, _)] = pipeline_steps(pipeline, v2.GaussianBlur)
        blur_runs = []
        handle = blur.register_forward_hook(lambda module, inputs, output, runs=blur_runs: runs.append(1))
        gray = []
        try:
            for _ in range(calls):
                crop = unnormalize(pipeline(colourful))
                # Grayscale output has equal channels; jitter, blur, solarize keep a colourful crop colourful.
                gray.append(bool((crop - crop.mean(dim=0)).abs().max() < 1e-4))
        finally:
            handle.remove()
        assert len(blur_runs) / calls == pytest.approx(blur_rate, abs=0.08), name
        assert sum(gray) / calls == pytest.approx(0.2, abs=0.08), name

        solarized = [unnormalize(pipeline(bright)).max().item() < 0.5 for _ in range(calls)]
        assert sum(solarized) / calls == pytest.approx(solarize_rate, abs=0.08), name


# ----------------------------------------------------------------------------------------------------------
# Seeded crops


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset("train", image_size=32)


def small_augmentation() -> MultiCropAugmentation:
    return MultiCropAugmentation(global_size=32, local_number=2, local_size=16)


def same_crops(first: dict, second: dict) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first["crops"], second["crops"], strict=True))


def test_same_seed_epoch_and_index_give_identical_crops_whatever_the_global_rng(digits):
    dataset = SeededCropsDataset(digits, small_augmentation(), seed=7)
    torch.manual_seed(1)
    first = dataset[(3, 10)]
    torch.manual_seed(2)
    torch.rand(100)
    again = SeededCropsDataset(digits, small_augmentation(), seed=7)[(3, 10)]
    assert same_crops(first, again)
    assert first["index"] == 10 and first["label"] == digits.targets[10]

    assert not same_crops(first, dataset[(4, 10)])  # another epoch
    assert not same_crops(first, SeededCropsDataset(digits, small_augmentation(), seed=8)[(3, 10)])


def test_seed_mixing_tells_apart_keys_that_a_sum_would_confuse():
    seeds = {mix_seeds(seed, epoch, index) for seed in range(3) for epoch in range(3) for index in range(3)}
    assert len(seeds) == 27 and all(0 <= seed < 2**64 for seed in seeds)
    assert mix_seeds(1, 2, 3) == mix_seeds(1, 2, 3)
    with pytest.raises(ValueError):
        mix_seeds(0, -1, 0)


def test_caller_rng_state_is_unchanged(digits):
    dataset = SeededCropsDataset(digits, small_augmentation(), seed=0)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    dataset[(0, 0)]
    dataset[(1, 5)]
    assert torch.equal(torch.get_rng_state(), state)


def test_collate_crops_stacks_views(digits):
    dataset = SeededCropsDataset(digits, small_augmentation(), seed=0)
    batch = collate_crops([dataset[(0, index)] for index in (4, 8, 15)])
    assert [tuple(view.shape) for view in batch["crops"]] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [
        digits.targets[i] for i in (4, 8, 15)
    ]
    assert batch["indices"].tolist() == [4, 8, 15]


def test_eval_transform_is_deterministic_resize_crop_normalise():
    transform = eval_transform(resize_size=40, crop_size=32)
    image = colour_noise(64)
    first, second = transform(image), transform(image)
    assert type(first) is torch.Tensor and first.shape == (3, 32, 32) and torch.equal(first, second)
    assert tuple(eval_transform()(Image.new("RGB", (300, 200))).shape) == (3, 224, 224)
    mean_colour = Image.new("RGB", (50, 50), tuple(round(255 * m) for m in IMAGENET_MEAN))
    assert transform(mean_colour).abs().max() < 0.01


def test_gram_teacher_crops_are_the_global_crops_at_a_larger_size():
    """DINOv3's Gram teacher input: the same box and flip as each global crop, more pixels, no colour changes."""
    import numpy as np

    rows, columns = np.mgrid[0:120, 0:160]
    pattern = ((rows // 20 + columns // 40) % 2 * 200 + columns // 4).astype(np.uint8)  # (120, 160) checks + ramp
    image = Image.fromarray(np.stack([pattern] * 3, axis=-1))
    augmentation = MultiCropAugmentation(global_size=32, local_number=2, local_size=16, mean=(0.5,) * 3,
                                         std=(0.5,) * 3, gram_teacher_size=96)
    assert augmentation.num_views == 6
    correlations = []
    for seed in range(12):
        torch.manual_seed(seed)
        crops = augmentation(image)
        assert [tuple(c.shape[-2:]) for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 2 + [(96, 96)] * 2
        student, teacher = crops[0].mean(0), crops[4].mean(0)  # global view 1 (no solarize) and its teacher crop
        small = torch.nn.functional.interpolate(teacher[None, None], size=(32, 32), mode="area")[0, 0]
        correlations.append(torch.corrcoef(torch.stack([student.flatten(), small.flatten()]))[0, 1].item())
        # No photometric change on the teacher crop: its grey levels stay those of the image.
        assert torch.allclose(crops[4][0], crops[4][1]) and torch.allclose(crops[4][1], crops[4][2])
    assert min(correlations) > 0.85 and sum(correlations) / len(correlations) > 0.9, correlations  # other boxes: ~0
