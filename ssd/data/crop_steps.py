"""The steps of a multi-crop view, made cheap on one core without changing what they produce.

Two costs of running DINO's recipe through torchvision.transforms.v2 on PIL images, and their replacements
(measured per worker in benchmarks/data_throughput.py, recorded in benchmarks/RESULTS.md):

- v2.GaussianBlur on a PIL image converts it to a float tensor and convolves it with the full 2-D kernel
  (23 x 23 taps at 224): ~10 ms per 224 crop, 40% of an image's time. `PILGaussianBlur` uses PIL's own blur
  (DINO's): ~1 ms.
- v2's per-call dispatch (tree flattening, type checks) and its four steps to a normalised tensor: `ViewPipeline`
  runs each step's own `transform`, `NormalizedTensor` converts in one pass.
- Resizing boxes of large photos (a 96 px crop from up to 3 megapixels): `bicubic_resized_crop` lets PIL
  box-average by an integer factor first when the box is 8x the crop or more (identical below that).

Every step draws the same numbers from torch's global RNG in the same order as v2, so `SeededCropsDataset`'s
per-sample seeding still fixes the crops, and with blur off they are v2's bit for bit. What is left is PIL's own
work, the same as the official DINO code's: bicubic resizing (~20%), the hue shift through HSV (~25%), the blur.
torch's antialiased uint8 resize would be 2.5x faster than PIL's on 224 crops but differs from it by 1-2 grey
levels on up to 10% of pixels, and JPEG draft decoding of large photos makes crops ~5% sharper: neither is used
(measurements in benchmarks/RESULTS.md, "Data loader throughput").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from ssd.data.deferred_photometric import identity_params, is_photometric, record_step, uint8_pixels


def matched_blur_radius(kernel_size: int, sigma: float) -> float:
    """The standard deviation of torchvision's Gaussian kernel of `kernel_size` taps at `sigma` (truncated,
    sampled, renormalised): the radius PIL's blur needs to blur exactly as much (same variance).

    Equal to sigma on 224 crops (23 taps); below it on 96 crops at large sigma (9 taps truncate: 2.0 -> 1.85) and
    at sigma < 0.5, where the sampled kernel is nearly a delta (0.3 -> 0.09: no blur either way).
    """
    offsets = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return math.sqrt(float((weights * offsets**2).sum() / weights.sum()))


class PILGaussianBlur(v2.GaussianBlur):
    """v2.GaussianBlur (same sigma draw from torch's RNG) that blurs PIL images with PIL's own filter.

    torchvision blurs a PIL image by converting it to a float tensor and convolving with the full 2-D kernel
    (23 x 23 taps at 224): ~10 ms per 224 crop on one core. PIL's extended box blur (what DINO used) takes ~1 ms.
    Its radius is matched to the variance of torchvision's truncated kernel, so the blur strength distribution is
    unchanged; pixels differ from torchvision's by < 1 grey level on average (kernel shape, edge handling), which
    tests/test_data_multicrop_speed.py checks is invisible in crop statistics.
    """

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, Image.Image):
            return super().transform(inpt, params)
        radius = matched_blur_radius(self.kernel_size[0], params["sigma"][0])
        return inpt.filter(ImageFilter.GaussianBlur(radius))


# PIL's two-step downscaling: a box at least 2 * REDUCING_GAP times the output per side is first box-averaged by
# an integer factor, leaving a bicubic step that still shrinks at least REDUCING_GAP times. On 1/f scenes the local
# crops came out 2.2% less sharp at 3 (Pillow's suggestion), 1.0% at 4, 0.3% at 5 (2.5x, 1.95x, 1.3x faster).
REDUCING_GAP = 4.0


def bicubic_resized_crop(image, top: int, left: int, height: int, width: int, size):
    """torchvision's bicubic resized_crop (crop, then antialiased resize to size (h, w)); on a PIL image with
    PIL's two-step downscaling at reducing_gap=4.

    Below an 8x reduction it changes nothing, bit for bit: with DINO's scales, local crops of images under ~1.5
    megapixels and global crops of images under ~3.2 (ImageNet's typical 500 x 375 is 0.19). From 2048 x 1536
    photos it makes the local crops ~2x cheaper (3.7 -> 1.9 ms each on one core, ~14 ms per image of 8), within half
    a grey level of the plain resize on average and ~1% less sharp (tests/test_data_multicrop_speed.py).
    """
    if not isinstance(image, Image.Image):
        return v2.functional.resized_crop(image, top, left, height, width, list(size),
                                          interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    box = image.crop((left, top, left + width, top + height))
    return box.resize((size[1], size[0]), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)


class PILResizedCrop(v2.RandomResizedCrop):
    """v2.RandomResizedCrop (same box drawn from torch's RNG) that resizes bicubic PIL crops through
    `bicubic_resized_crop`; other interpolations go through v2."""

    def transform(self, inpt, params: dict):
        if self.interpolation != v2.InterpolationMode.BICUBIC or not self.antialias:
            return super().transform(inpt, params)
        return bicubic_resized_crop(inpt, params["top"], params["left"], params["height"], params["width"], self.size)


def v2_normalize_steps(mean: Sequence[float], std: Sequence[float]) -> list:
    """PIL image or uint8 tensor -> float32 tensor (3, H, W), normalised, as a plain torch.Tensor, in v2 steps."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


class NormalizedTensor:
    """PIL RGB image -> float32 tensor (3, H, W), (pixels / 255 - mean) / std, with one copy and in-place ops.

    Same operations, so the same values bit for bit, as v2.ToImage + ToDtype(scale) + Normalize + ToPureTensor,
    without their per-step dispatch and copies. The tensor is a (3, H, W) view of (H, W, 3) memory, as theirs was.
    Other inputs (tensors) go through those v2 steps.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.v2_steps = v2.Compose(v2_normalize_steps(mean, std))

    def __repr__(self) -> str:  # stable across processes: evaluation caches are keyed on transform reprs
        return f"{type(self).__name__}(mean={self.mean.tolist()}, std={self.std.tolist()})"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            return self.v2_steps(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3), a writable copy
        return pixels.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std).permute(2, 0, 1)


# Steps that v2 runs only when torch.rand(1) < p, drawn before their own parameters.
_RANDOMLY_APPLIED = (v2.RandomHorizontalFlip, v2.RandomGrayscale, v2.RandomSolarize)


class ViewPipeline(v2.Compose):
    """v2.Compose that runs its steps on one image without v2's per-call overhead.

    v2's Transform.__call__ flattens its inputs into a tree, checks their types and dispatches on them, ~50 us a
    step, ~60 steps an image (~5% of the time per image once the blur is fast). Here each step draws the same numbers
    from torch's RNG in the same order as v2 does (its `p` test, then make_params) and runs its own `transform`,
    so the crops are v2's bit for bit (tests/test_data_multicrop_speed.py). The blur stays a module call, so
    forward hooks see every blur; a step of another type runs through v2 unchanged.

    defer_photometric=True: the geometric steps run, the colour steps only draw their parameters (same draws) and
    the last step, a NormalizedTensor, is left to the device: returns (uint8 pixels (3, H, W), parameter row);
    see ssd/data/deferred_photometric.py.
    """

    def __init__(self, transforms, defer_photometric: bool = False):
        super().__init__(transforms)
        if defer_photometric and not isinstance(transforms[-1], NormalizedTensor):
            raise ValueError("defer_photometric needs a NormalizedTensor as the last step")
        self.defer_photometric = defer_photometric

    def forward(self, image):
        if self.defer_photometric:
            return self._geometry_and_params(image)
        for step in self.transforms:
            image = _run_step(step, image)
        return image

    def _geometry_and_params(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        *steps, normalize = self.transforms
        params = identity_params(normalize.mean, normalize.std)
        for step in steps:
            if is_photometric(step):
                record_step(step, params)
            else:
                image = _run_step(step, image)
        return uint8_pixels(image), params


def _run_step(step, image):
    if isinstance(step, v2.RandomApply):
        if torch.rand(1) >= step.p:
            return image
        for inner in step.transforms:
            image = _run_step(inner, image)
        return image
    if isinstance(step, _RANDOMLY_APPLIED) and torch.rand(1) >= step.p:
        return image
    if isinstance(step, (*_RANDOMLY_APPLIED, v2.RandomResizedCrop, v2.ColorJitter, v2.RandomRotation)):
        return step.transform(image, step.make_params([image]))
    return step(image)
