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
from ssd.data.crop_steps import PILResizedCrop

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


# ----------------------------------------------------------------------------------------------------------
# Augmentation knobs (flip, photometric and blur probabilities, rotation): 0 really turns a step off


def half_bright(size: int = 32) -> Image.Image:
    """Left half white, right half black: a flip swaps which half is bright."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2] = 255
    return Image.fromarray(pixels)


def whole_image_crops(**options) -> MultiCropAugmentation:
    """Crops of the whole (square) image: RandomResizedCrop at scale 1 falls back to the full image, so any
    difference between crops comes from the steps after it."""
    return MultiCropAugmentation(global_size=32, global_scale=(1.0, 1.0), local_number=2, local_size=16,
                                 local_scale=(1.0, 1.0), mean=(0.5,) * 3, std=(0.5,) * 3, **options)


NO_PHOTOMETRIC = dict(color_jitter_probability=0.0, grayscale_probability=0.0, blur_probabilities=(0.0, 0.0, 0.0),
                      solarize_probability=0.0)


@pytest.mark.parametrize("flip_probability, flipped_share", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_flip_probability_sets_how_often_crops_are_mirrored(torch_single_thread, flip_probability, flipped_share):
    torch.manual_seed(0)
    augmentation = whole_image_crops(flip_probability=flip_probability, **NO_PHOTOMETRIC)
    crops = [crop for _ in range(50) for crop in augmentation(half_bright())]
    flipped = [bool(crop[:, :, crop.shape[-1] // 2:].mean() > crop[:, :, : crop.shape[-1] // 2].mean()) for crop in crops]
    assert sum(flipped) / len(flipped) == pytest.approx(flipped_share, abs=0.1)


def test_without_photometric_steps_every_crop_is_the_plain_resized_image(torch_single_thread):
    torch.manual_seed(0)
    augmentation = whole_image_crops(flip_probability=0.0, **NO_PHOTOMETRIC)
    for view in ("global_transform_1", "global_transform_2", "local_transform"):
        pipeline = getattr(augmentation, view)
        assert [type(step) for step in pipeline.transforms[:1]] == [PILResizedCrop]
        assert not any(pipeline_steps(pipeline, kind) for kind in (v2.RandomHorizontalFlip, v2.ColorJitter,
                       v2.RandomGrayscale, v2.GaussianBlur, v2.RandomSolarize, v2.RandomRotation))
    image = colour_noise(32)
    plain_global = eval_transform(32, 32, (0.5,) * 3, (0.5,) * 3)(image)
    plain_local = eval_transform(16, 16, (0.5,) * 3, (0.5,) * 3)(image)
    for _ in range(5):
        global_1, global_2, *locals_ = augmentation(image)
        assert torch.allclose(global_1, plain_global, atol=1e-6) and torch.allclose(global_2, plain_global, atol=1e-6)
        assert all(torch.allclose(local, plain_local, atol=1e-6) for local in locals_)


def test_blur_and_solarize_probabilities_go_to_their_views():
    augmentation = MultiCropAugmentation(global_size=32, local_size=16, blur_probabilities=(0.3, 0.0, 0.7),
                                         solarize_probability=0.4, color_jitter_probability=0.5,
                                         grayscale_probability=0.1)
    blur = {view: [p for _, p in pipeline_steps(getattr(augmentation, view), v2.GaussianBlur)]
            for view in ("global_transform_1", "global_transform_2", "local_transform")}
    assert blur == {"global_transform_1": [0.3], "global_transform_2": [], "local_transform": [0.7]}
    assert [p for _, p in pipeline_steps(augmentation.global_transform_2, v2.RandomSolarize)] == [0.4]
    assert not pipeline_steps(augmentation.global_transform_1, v2.RandomSolarize)
    assert [p for _, p in pipeline_steps(augmentation.local_transform, v2.ColorJitter)] == [0.5]
    assert [p for _, p in pipeline_steps(augmentation.local_transform, v2.RandomGrayscale)] == [0.1]


def bar_angle(crop: torch.Tensor) -> float:
    """Angle in degrees of the main axis of the bright pixels (second moments), 0 for a vertical bar."""
    weights = (crop.mean(0) + 1).clamp_min(0)  # back to 0..2, background 0
    rows, columns = torch.meshgrid(torch.arange(crop.shape[-2]).float(), torch.arange(crop.shape[-1]).float(),
                                   indexing="ij")
    total = weights.sum()
    mean_row, mean_column = (weights * rows).sum() / total, (weights * columns).sum() / total
    d_row, d_column = rows - mean_row, columns - mean_column
    var_row, var_column = (weights * d_row**2).sum() / total, (weights * d_column**2).sum() / total
    covariance = (weights * d_row * d_column).sum() / total
    return float(torch.rad2deg(0.5 * torch.atan2(2 * covariance, var_row - var_column)))


def test_rotation_turns_crops_within_the_configured_angle(torch_single_thread):
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[4:28, 14:18] = 255  # a vertical bar in the middle
    image = Image.fromarray(pixels)
    torch.manual_seed(0)
    angles = [abs(bar_angle(crop)) for _ in range(30)
              for crop in whole_image_crops(flip_probability=0.0, rotation_degrees=20, **NO_PHOTOMETRIC)(image)[:2]]
    assert max(angles) < 22 and sum(angle > 8 for angle in angles) > len(angles) // 3, angles
    still = [abs(bar_angle(crop)) for crop in whole_image_crops(flip_probability=0.0, **NO_PHOTOMETRIC)(image)]
    assert max(still) < 1.0


def test_invalid_augmentation_options_are_refused():
    with pytest.raises(ValueError, match="blur_probabilities"):
        MultiCropAugmentation(blur_probabilities=(1.0, 0.1))
    with pytest.raises(ValueError, match="probabilities"):
        MultiCropAugmentation(flip_probability=1.5)
    with pytest.raises(ValueError, match="rotation_degrees"):
        MultiCropAugmentation(rotation_degrees=-5)


def test_gram_teacher_crop_follows_the_rotation_and_flip_of_its_global_crop(torch_single_thread):
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[8:56, 20:28] = 255  # an off-centre vertical bar: rotation and flip both move it
    image = Image.fromarray(pixels)
    augmentation = MultiCropAugmentation(global_size=32, global_scale=(1.0, 1.0), local_number=0, mean=(0.5,) * 3,
                                         std=(0.5,) * 3, gram_teacher_size=64, rotation_degrees=30, **NO_PHOTOMETRIC)
    for seed in range(6):
        torch.manual_seed(seed)
        global_1, _, teacher_1, _ = augmentation(image)
        small = torch.nn.functional.interpolate(teacher_1[None], size=(32, 32), mode="area")[0]
        assert torch.corrcoef(torch.stack([global_1.mean(0).flatten(), small.mean(0).flatten()]))[0, 1] > 0.9


def test_config_keys_reach_the_augmentation():
    from ssd.config import ConfigError, load_config
    from ssd.train import build_transform

    cfg = load_config("dino_digits_demo", ["crops.flip_probability=0.25", "crops.blur_probabilities=[0.0,0.2,0.3]",
                                           "crops.rotation_degrees=12", "crops.color_jitter_probability=0"])
    augmentation = build_transform(cfg)
    assert [p for _, p in pipeline_steps(augmentation.local_transform, v2.RandomHorizontalFlip)] == [0.25]
    assert [p for _, p in pipeline_steps(augmentation.local_transform, v2.GaussianBlur)] == [0.3]
    assert not pipeline_steps(augmentation.global_transform_1, v2.GaussianBlur)
    assert not pipeline_steps(augmentation.global_transform_1, v2.ColorJitter)
    [(rotation, _)] = pipeline_steps(augmentation.global_transform_2, v2.RandomRotation)
    assert tuple(rotation.degrees) == (-12.0, 12.0)
    with pytest.raises(ConfigError, match="blur_probabilities"):
        load_config("dino_digits_demo", ["crops.blur_probabilities=[0.5,0.5]"])
    with pytest.raises(ConfigError, match="flip_probability"):
        load_config("dino_digits_demo", ["crops.flip_probability=2"])
