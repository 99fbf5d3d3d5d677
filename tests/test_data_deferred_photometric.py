"""crops.photometric_on=device: the loader crops and draws, the trainer applies the colour steps in float.

The device steps are checked against torchvision's own float kernels, the drawn parameters against the loader
pipeline's draws (same RNG stream, same crops without colour steps, bit for bit), the result against the loader's
PIL crops, crop by crop and in distribution, on JPEG files read through the real data path; and a run that uses
it trains, and resumes after SIGKILL bitwise equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ssd.config import ConfigError, load_config
from ssd.data import IMAGENET_STD, MultiCropAugmentation, SeededCropsDataset
from ssd.data import deferred_photometric as deferred
from ssd.data.seeded import collate_crops
from tests.test_data_multicrop_speed import crop_statistics, ks_p_values
from tests.tiny import assert_resume_after_sigkill_is_bitwise_equal, final_weights, run_training, tiny_overrides

STD_255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # a normalised difference * this = grey levels


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))


FACTORS = torch.tensor([0.6, 0.85, 1.0, 1.1, 1.25, 1.4])
HUE_SHIFTS = torch.tensor([-0.1, -0.04, 0.0, 0.02, 0.1, 0.5])


@pytest.mark.parametrize("name, ours, theirs, factors", [
    ("brightness", deferred._brightness, TF.adjust_brightness, FACTORS),
    ("contrast", deferred._contrast, TF.adjust_contrast, FACTORS),
    ("saturation", deferred._saturation, TF.adjust_saturation, FACTORS),
    ("hue", deferred._hue, TF.adjust_hue, HUE_SHIFTS),
])
def test_each_colour_step_equals_torchvisions_float_kernel_per_sample(pixels, name, ours, theirs, factors):
    expected = torch.stack([theirs(image, float(factor)) for image, factor in zip(pixels, factors)])
    torch.testing.assert_close(ours(pixels.clone(), factors), expected, atol=1e-5, rtol=0)


def test_blur_equals_torchvisions_gaussian_blur_per_sample(pixels):
    sigmas = torch.tensor([0.1, 0.4, 0.9, 1.3, 1.7, 2.0])
    for taps in (3, 9):
        expected = torch.stack([TF.gaussian_blur(image, [taps, taps], [float(sigma)] * 2)
                                for image, sigma in zip(pixels, sigmas)])
        torch.testing.assert_close(deferred._blur(pixels.clone(), sigmas, taps), expected, atol=1e-5, rtol=0)


def test_a_whole_parameter_row_applies_the_steps_in_its_order(pixels):
    """Jitter in the drawn order, then grayscale, blur, solarize, normalise: as v2 would on float tensors."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rows = deferred.identity_params(mean, std).repeat(6, 1)
    rows[:, deferred.JITTER] = torch.tensor([1, 1, 1, 0, 1, 1.0])
    rows[1, deferred.ORDER] = torch.tensor([3.0, 2, 1, 0])
    rows[2, deferred.ORDER] = torch.tensor([1.0, 3, 0, 2])
    rows[:, deferred.FACTORS] = torch.tensor([[1.3, 0.7, 1.2, 0.05]]).repeat(6, 1)
    rows[4, deferred.GRAYSCALE] = 1
    rows[[0, 4, 5], deferred.BLUR] = 1
    rows[:, deferred.SIGMA], rows[:, deferred.KERNEL] = 1.2, 5
    rows[[2, 5], deferred.SOLARIZE], rows[:, deferred.THRESHOLD] = 1, 0.5
    uint8 = (pixels * 255).round().to(torch.uint8)
    got = deferred.apply_photometric_group(uint8, rows)

    steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for image, row, result in zip(uint8, rows, got):
        x = image.float() / 255
        if row[deferred.JITTER]:
            for operation in row[deferred.ORDER].long().tolist():
                x = steps[operation](x, float(row[deferred.FACTORS][operation]))
        if row[deferred.GRAYSCALE]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if row[deferred.BLUR]:
            x = TF.gaussian_blur(x, [5, 5], [1.2, 1.2])
        if row[deferred.SOLARIZE]:
            x = TF.solarize(x, 0.5)
        torch.testing.assert_close(result, TF.normalize(x, list(mean), list(std)), atol=1e-4, rtol=0)


def test_the_device_view_draws_what_the_loader_view_draws(jpeg_folder):
    """Same seed: the RNG ends in the same state, and without colour steps the crops are equal bit for bit."""
    no_colour = dict(color_jitter_probability=0, grayscale_probability=0, blur_probabilities=(0, 0, 0),
                     solarize_probability=0)
    for options in ({}, no_colour, dict(gram_teacher_size=48, rotation_degrees=10)):
        loader = MultiCropAugmentation(local_number=3, **options)
        on_device = MultiCropAugmentation(local_number=3, photometric_on="device", **options)
        for seed in range(6):
            image = jpeg_folder.load(seed)[0]
            torch.manual_seed(seed)
            expected, after_loader = loader(image), torch.rand(1)
            torch.manual_seed(seed)
            drawn, after_device = on_device(image), torch.rand(1)
            assert after_loader == after_device
            assert all(crop.dtype == torch.uint8 for crop in drawn["crops"])
            got = deferred.apply_photometric([crop[None] for crop in drawn["crops"]], drawn["photometric"][:, None])
            if options is no_colour or options.get("gram_teacher_size"):
                uncoloured = slice(None) if options is no_colour else slice(-2, None)  # the Gram teacher's crops
                for want, have in zip(expected[uncoloured], got[uncoloured]):
                    assert torch.equal(want, have[0])


def seeded_batch(dataset, transform, seed: int) -> dict:
    samples = SeededCropsDataset(dataset, transform, seed=seed)
    return collate_crops([samples[(0, index)] for index in range(len(dataset))])


def grey_level_differences(loader_batch: dict, device_batch: dict) -> np.ndarray:
    """Mean |loader - device| per crop, in grey levels (0..255), (V, B)."""
    got = deferred.apply_photometric(device_batch["crops"], device_batch["photometric"])
    return np.array([((want - have) * STD_255).abs().mean(dim=(1, 2, 3)).numpy()
                     for want, have in zip(loader_batch["crops"], got)])


def test_device_crops_are_the_loaders_within_grey_levels_crop_by_crop(jpeg_folder):
    """Same seeds, same files: float steps against PIL's 8-bit ones (hue through 8-bit HSV is most of the gap)."""
    loader_batch = seeded_batch(jpeg_folder, MultiCropAugmentation(), seed=3)
    device_batch = seeded_batch(jpeg_folder, MultiCropAugmentation(photometric_on="device"), seed=3)
    differences = grey_level_differences(loader_batch, device_batch)
    assert differences.mean() < 1.5 and differences.max() < 4.0, differences

    # The bound has teeth: the same crops with another sample's colour parameters are far off.
    device_batch["photometric"] = device_batch["photometric"].roll(1, dims=1)
    assert grey_level_differences(loader_batch, device_batch).mean() > 8.0


def test_device_crops_follow_the_loaders_distribution(jpeg_folder):
    """Independent seeds, 96 samples: KS tests on per-crop mean, std and sharpness of every view (the test that
    tests/test_data_multicrop_speed.py shows fails for a blur left out or applied twice)."""
    samples = SeededCropsDataset(jpeg_folder, MultiCropAugmentation(), seed=11)
    reference = [samples[(epoch, index)]["crops"] for epoch in range(4) for index in range(len(jpeg_folder))]
    device_crops: list[list[torch.Tensor]] = [[] for _ in reference]
    for epoch in range(4):
        on_device = SeededCropsDataset(jpeg_folder, MultiCropAugmentation(photometric_on="device"), seed=12)
        batch = collate_crops([on_device[(epoch, index)] for index in range(len(jpeg_folder))])
        views = deferred.apply_photometric(batch["crops"], batch["photometric"])
        for index in range(len(jpeg_folder)):
            device_crops[epoch * len(jpeg_folder) + index] = [view[index] for view in views]
    p_values = ks_p_values(crop_statistics(reference), crop_statistics(device_crops))
    assert min(p_values.values()) > 1e-3, p_values


def test_photometric_on_must_be_known():
    with pytest.raises(ConfigError, match="crops.photometric_on"):
        load_config(None, ["crops.photometric_on=gpu"])
    with pytest.raises(ValueError, match="photometric_on"):
        MultiCropAugmentation(photometric_on="auto")  # resolved by build_transform, not here


def test_auto_puts_the_colour_steps_on_the_device_only_on_a_gpu():
    from ssd.train import build_transform

    cfg = load_config(None, [])
    assert build_transform(cfg, "cpu").photometric_on == "loader"
    assert build_transform(cfg, "cuda").photometric_on == "device"
    cfg = load_config(None, ["crops.photometric_on=device"])
    assert build_transform(cfg, "cpu").photometric_on == "device"


def test_a_run_with_colour_steps_on_the_device_trains_and_resumes_bitwise(tmp_path):
    overrides = ("crops.photometric_on=device", "train.epochs=6", "data.num_workers=1")
    assert_resume_after_sigkill_is_bitwise_equal(tmp_path, overrides, kill_at_step=9)
    result = run_training(tiny_overrides(tmp_path, "announced", *overrides, "train.max_steps=1"))
    assert "colour steps on the device" in result.stderr


def test_dinov3_with_gram_teacher_crops_and_masks_trains_with_colour_steps_on_the_device(tmp_path):
    """Masks from the collate, the Gram teacher's uncoloured crops at another size, all through a worker."""
    from tests.test_method_dinov3 import DINOV3

    result = run_training(tiny_overrides(tmp_path, "dinov3", *DINOV3, "crops.photometric_on=device",
                                         "data.num_workers=1", "train.max_steps=4"))
    assert "colour steps on the device" in result.stderr
    assert (tmp_path / "dinov3" / "checkpoint_00000004.pt").exists()


def test_two_processes_apply_the_colour_steps_as_one_process_does(tmp_path):
    """Each rank applies the steps to its half of the batch: the same weights as one process (as for DDP with
    the steps in the loader, tests/test_train_ddp.py)."""
    from tests.test_train_ddp import SAME

    run_training(tiny_overrides(tmp_path, "one", *SAME, "crops.photometric_on=device"))
    run_training(tiny_overrides(tmp_path, "two", *SAME, "crops.photometric_on=device"), nproc=2)
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    run_training(tiny_overrides(tmp_path, "loader", *SAME, "crops.photometric_on=loader"))
    loader = final_weights(tmp_path / "loader")  # other pixels, so other weights: the device steps did run
    assert max((loader[name] - one[name]).abs().max() for name in one) > 1e-5
