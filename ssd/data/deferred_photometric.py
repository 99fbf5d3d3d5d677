"""DINO's colour steps run on the training device: the loader draws their parameters, the trainer applies them.

With `crops.photometric_on=device` (the default `auto` picks it when training on a GPU), a loader worker does only
the geometric part of a view (decode, random resized crop, rotation, flip) and returns the crop as uint8 pixels,
together with one row of numbers per crop saying what the colour steps would have done: whether colour jitter
ran, its order and four factors, grayscale, the blur and its sigma, solarization, and the normalisation. The
numbers come from the same draws of torch's RNG, in the same order, as `crop_steps.ViewPipeline` makes when it
applies the steps itself, so a seeded sample gets the same crop box, flip and colour parameters either way.

`apply_photometric` then runs the steps on whole batches of float pixels on the device: no rounding to 8 bits
between steps, torchvision's exact Gaussian kernel instead of PIL's box approximation. Crop by crop the result is
within ~1.5 grey levels (mean) of the loader's PIL pipeline (tests/test_data_deferred_photometric.py); a worker
does ~40% of the work per image and sends a quarter of the bytes (uint8, not float32). Which samples each step
touches is read from the parameters while they are still on the host, so applying them never waits on the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

# One row of parameters per crop (float32). Identity values for steps that did not run.
JITTER = 0  # 1: colour jitter ran
ORDER = slice(1, 5)  # the order of its four operations: 0 brightness, 1 contrast, 2 saturation, 3 hue
FACTORS = slice(5, 9)  # brightness, contrast, saturation factors (1 = unchanged) and hue shift (0 = unchanged)
GRAYSCALE = 9
BLUR = 10
SIGMA = 11
KERNEL = 12  # taps of the Gaussian kernel (odd)
SOLARIZE = 13
THRESHOLD = 14  # in [0, 1]: pixels at or above it are inverted
MEAN = slice(15, 18)
STD = slice(18, 21)
NUM_PARAMS = 21

_JITTER_OPERATIONS = 4


def identity_params(mean, std) -> torch.Tensor:
    """The row of a crop whose colour steps all did nothing: only normalised."""
    params = torch.zeros(NUM_PARAMS)
    params[ORDER] = torch.arange(_JITTER_OPERATIONS, dtype=torch.float32)
    params[FACTORS] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    params[MEAN] = torch.as_tensor(mean, dtype=torch.float32)
    params[STD] = torch.as_tensor(std, dtype=torch.float32)
    return params


def is_photometric(step) -> bool:
    """Steps that change colours, not geometry: the ones this module can defer."""
    if isinstance(step, v2.RandomApply):
        return all(is_photometric(inner) for inner in step.transforms)
    return isinstance(step, (v2.ColorJitter, v2.RandomGrayscale, v2.GaussianBlur, v2.RandomSolarize))


def record_step(step, params: torch.Tensor) -> None:
    """Draw what `step` draws from torch's RNG, in ViewPipeline's order, and write what it would do into params."""
    if isinstance(step, v2.RandomApply):
        if torch.rand(1) >= step.p:
            return
        for inner in step.transforms:
            record_step(inner, params)
        return
    if isinstance(step, (v2.RandomGrayscale, v2.RandomSolarize)) and torch.rand(1) >= step.p:
        return
    if isinstance(step, v2.ColorJitter):
        drawn = step.make_params([])
        params[JITTER] = 1.0
        params[ORDER] = drawn["fn_idx"].to(torch.float32)
        for offset, name in enumerate(("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")):
            if drawn[name] is not None:
                params[FACTORS.start + offset] = drawn[name]
    elif isinstance(step, v2.RandomGrayscale):
        params[GRAYSCALE] = 1.0
    elif isinstance(step, v2.GaussianBlur):
        if step.kernel_size[0] != step.kernel_size[1]:
            raise ValueError(f"deferred blur needs a square kernel, got {step.kernel_size}")
        params[BLUR] = 1.0
        params[SIGMA] = step.make_params([])["sigma"][0]
        params[KERNEL] = step.kernel_size[0]
    elif isinstance(step, v2.RandomSolarize):
        params[SOLARIZE] = 1.0
        params[THRESHOLD] = step.threshold / 255.0  # the loader's steps run on 8-bit PIL images
    else:
        raise TypeError(f"{type(step).__name__} is not a colour step that can run on the device")


def uint8_pixels(image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W), a view of (H, W, 3) memory (one copy of the pixels)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


# ---- the steps on float pixels in [0, 1], one factor per sample ---------------------------------------------
def _gray(pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W), ITU-R 601 luma (PIL's and torchvision's weights)."""
    red, green, blue = pixels.unbind(1)
    return (0.2989 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def _blend(pixels: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * pixels + (1 - factor) * other, clamped to [0, 1]; factor (n,)."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * pixels + (1 - factor) * other).clamp_(0, 1)


def _brightness(pixels, factor):
    return _blend(pixels, torch.zeros((), device=pixels.device), factor)


def _contrast(pixels, factor):
    return _blend(pixels, _gray(pixels).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(pixels, factor):
    return _blend(pixels, _gray(pixels), factor)


def _hue(pixels, shift):
    """Rotate the hue by `shift` turns (n,): to HSV, shift, back."""
    value, _ = pixels.max(dim=1)
    lowest, _ = pixels.min(dim=1)
    chroma = value - lowest
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    red, green, blue = pixels.unbind(1)
    sector = torch.where(value == red, ((green - blue) / safe_chroma) % 6,
                         torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4))
    sector = torch.where(chroma > 0, sector, torch.zeros_like(sector))
    sector = (sector + 6 * shift.view(-1, 1, 1)) % 6
    # Back to RGB: channel n of the hexcone at sector h is value - chroma * clamp(min(k, 4 - k), 0, 1) with
    # k = (n + h) mod 6 and n = 5, 3, 1 for red, green, blue.
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = (sector + offset) % 6
        channels.append(value - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)


_OPERATIONS = (_brightness, _contrast, _saturation, _hue)


def _blur(pixels: torch.Tensor, sigma: torch.Tensor, taps: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per sample: torchvision's sampled, renormalised kernel, reflected edges."""
    count, channels, height, width = pixels.shape
    offsets = torch.arange(taps, device=pixels.device, dtype=pixels.dtype) - taps // 2
    kernels = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (n * 3, taps)
    half = taps // 2
    flat = F.pad(pixels.reshape(1, count * channels, height, width), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernels.view(-1, 1, 1, taps), groups=count * channels)
    flat = F.conv2d(flat, kernels.view(-1, 1, taps, 1), groups=count * channels)
    return flat.view(count, channels, height, width)


def _rows(selected: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Host bool mask -> indices on the device, or None when no sample is selected (decided on the host)."""
    rows = selected.nonzero().flatten()
    return rows.to(device, non_blocking=True) if len(rows) else None


def apply_photometric_group(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 crops (n, 3, H, W) on the device and their params (n, NUM_PARAMS) on the host -> normalised float32."""
    device = pixels.device
    x = pixels.to(torch.float32).mul_(1.0 / 255)  # as NormalizedTensor: equal bit for bit without colour steps
    on_device = params.to(device, non_blocking=True)
    jittered = params[:, JITTER] > 0
    for position in range(_JITTER_OPERATIONS):
        for operation, function in enumerate(_OPERATIONS):
            selected = jittered & (params[:, ORDER.start + position] == operation)
            rows = _rows(selected, device)
            if rows is not None:
                x[rows] = function(x[rows], on_device[rows, FACTORS.start + operation])
    rows = _rows(params[:, GRAYSCALE] > 0, device)
    if rows is not None:
        x[rows] = _gray(x[rows]).expand(-1, 3, -1, -1)
    blurred = params[:, BLUR] > 0
    for taps in params[blurred, KERNEL].unique().tolist():
        rows = _rows(blurred & (params[:, KERNEL] == taps), device)
        x[rows] = _blur(x[rows], on_device[rows, SIGMA], int(taps))
    solarized = params[:, SOLARIZE] > 0
    rows = _rows(solarized, device)
    if rows is not None:
        threshold = on_device[rows, THRESHOLD].view(-1, 1, 1, 1)
        x[rows] = torch.where(x[rows] >= threshold, 1 - x[rows], x[rows])
    mean, std = on_device[:, MEAN].view(-1, 3, 1, 1), on_device[:, STD].view(-1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def apply_photometric(crops: list[torch.Tensor], params: torch.Tensor) -> list[torch.Tensor]:
    """V uint8 crops (B, 3, H, W) on the device and params (V, B, NUM_PARAMS) on the host -> V float32 crops.

    Crops of the same size go through the steps together (two batches for DINO's 2 x 224 + 8 x 96)."""
    if len(crops) != params.shape[0]:
        raise ValueError(f"{len(crops)} crops but parameters for {params.shape[0]}")
    out: list[torch.Tensor | None] = [None] * len(crops)
    by_shape: dict[tuple, list[int]] = {}
    for view, crop in enumerate(crops):
        by_shape.setdefault(tuple(crop.shape[1:]), []).append(view)
    for views in by_shape.values():
        pixels = torch.cat([crops[view] for view in views])
        group = apply_photometric_group(pixels, torch.cat([params[view] for view in views]))
        for view, result in zip(views, group.split([len(crops[view]) for view in views])):
            out[view] = result
    return out
