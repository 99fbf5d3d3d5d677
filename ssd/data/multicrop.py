"""DINO's multi-crop augmentation (Caron et al. 2021, Sec. 3.1 and Appendix) with torchvision.transforms.v2.

Each image gives 2 global crops (large, seen by teacher and student) and `local_number` local crops (small,
student only). The three pipelines differ only in crop size/scale, blur probability and solarization:

    view        RandomResizedCrop scale   blur p   solarize p
    global 1    global_scale              1.0      0.0
    global 2    global_scale              0.1      0.2
    local       local_scale               0.5      0.0

All views share: horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2.
With `gram_teacher_size` (DINOv3), each global crop also comes at that size, same box and flip, unaltered.

These are the defaults. The probabilities (flip, jitter, grayscale, per-view blur, solarize) are arguments, and a
random rotation of each crop can be added, for data where DINO's photo recipe is wrong: a flipped digit is
another shape, and colour changes do nothing on grey strokes. A probability of 0 leaves its step out.
The transforms draw from torch's global RNG; `SeededCropsDataset` seeds it per sample for reproducibility.
They are v2 transforms run by `crop_steps.ViewPipeline`, with PIL's blur in place of v2's tensor blur on PIL images
(10x faster at 224, same blur strength): see crop_steps.py for what that changes and what it does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop, v2

from ssd.data.crop_steps import (
    NormalizedTensor,
    PILGaussianBlur,
    PILResizedCrop,
    ViewPipeline,
    bicubic_resized_crop,
    v2_normalize_steps,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # on 0..255 values: the transforms run on PIL (uint8) images
BICUBIC = v2.InterpolationMode.BICUBIC
BILINEAR = v2.InterpolationMode.BILINEAR  # for rotations: torchvision rotates tensors only nearest or bilinear


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian kernel of about 10% of the crop side, at least 3 (SimCLR's rule; DINO used PIL's radius).

    224 -> 23, 96 -> 9. At the largest sigma (2.0) a 23-tap kernel covers +-5.5 sigma, a 9-tap one +-2 sigma:
    sigma sets the blur strength, the kernel only has to be wide enough not to truncate it badly.
    """
    size = max(3, crop_size // 10)
    return size if size % 2 == 1 else size + 1


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    """PIL image -> float32 tensor (3, H, W), normalised, as a plain torch.Tensor (not a tv_tensors.Image)."""
    return [NormalizedTensor(mean, std)]


@dataclass(frozen=True)
class SharedSteps:
    """What every view does the same way (DINO's values by default); a probability of 0 leaves the step out."""

    flip_p: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    rotation_degrees: float = 0.0  # each crop turned by a uniform angle in +-this, corners black; 0: none


def _photometric(size: int, blur_p: float, solarize_p: float, shared: SharedSteps = SharedSteps()) -> list:
    jitter_p, grayscale_p = shared.jitter_p, shared.grayscale_p
    steps = []
    if jitter_p > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                    p=jitter_p))
    if grayscale_p > 0:
        steps.append(v2.RandomGrayscale(p=grayscale_p))
    if blur_p > 0:
        steps.append(v2.RandomApply([PILGaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
    return steps


def _geometry(size: int, scale: tuple[float, float], shared: SharedSteps) -> list:
    """Crop, then turn the crop (rotation_degrees > 0), then flip."""
    steps = [PILResizedCrop(size, scale=scale, interpolation=BICUBIC)]
    if shared.rotation_degrees > 0:
        steps.append(v2.RandomRotation(shared.rotation_degrees, interpolation=BILINEAR))
    if shared.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=shared.flip_p))
    return steps


def _view_pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, mean, std,
                   shared: SharedSteps, defer: bool) -> ViewPipeline:
    photometric = _photometric(size, blur_p, solarize_p, shared)
    return ViewPipeline(_geometry(size, scale, shared) + photometric + _normalize(mean, std), defer)


class _ViewWithTeacherCrop:
    """A global view and the same crop (box and flip) at `teacher_size` without photometric changes: the input
    of DINOv3's Gram teacher, which sees the student's crop at a higher resolution (more pixels of the original
    image, not an upsampled copy)."""

    def __init__(self, size: int, teacher_size: int, scale, blur_p: float, solarize_p: float, mean, std,
                 shared: SharedSteps, defer: bool):
        self.size, self.teacher_size, self.scale = size, teacher_size, tuple(scale)
        self.flip_p, self.rotation_degrees = shared.flip_p, shared.rotation_degrees
        self.photometric = ViewPipeline(_photometric(size, blur_p, solarize_p, shared) + _normalize(mean, std), defer)
        self.plain = ViewPipeline(_normalize(mean, std), defer)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        flip = bool(torch.rand(1) < self.flip_p)
        angle = 0.0
        if self.rotation_degrees > 0:
            angle = float(torch.empty(1).uniform_(-self.rotation_degrees, self.rotation_degrees))
        crops = []
        for size in (self.size, self.teacher_size):
            crop = bicubic_resized_crop(image, top, left, height, width, (size, size))
            if angle:
                crop = v2.functional.rotate(crop, angle, interpolation=BILINEAR)
            crops.append(v2.functional.horizontal_flip(crop) if flip else crop)
        return self.photometric(crops[0]), self.plain(crops[1])  # pairs (pixels, parameters) when deferred


class MultiCropAugmentation:
    """PIL image -> [global_1, global_2, local_1, ..., local_n]: 2 tensors (3, G, G), n tensors (3, L, L)."""

    def __init__(
        self,
        global_size: int = 224,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_number: int = 8,
        local_size: int = 96,
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        gram_teacher_size: int = 0,
        flip_probability: float = 0.5,
        color_jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        blur_probabilities: Sequence[float] = (1.0, 0.1, 0.5),  # global 1, global 2, local
        solarize_probability: float = 0.2,  # global 2 only
        rotation_degrees: float = 0.0,  # each crop turned by a uniform angle in +-this; 0: no rotation (DINO)
        global_number: int = 2,  # 1: only the first global crop (I-JEPA, MAE)
        photometric_on: str = "loader",  # "device": colour steps left to the trainer (deferred_photometric.py)
    ):
        if photometric_on not in ("loader", "device"):
            raise ValueError(f"photometric_on must be 'loader' or 'device', got {photometric_on!r}")
        self.photometric_on = photometric_on
        defer = photometric_on == "device"
        if global_number not in (1, 2):
            raise ValueError(f"global_number must be 1 or 2, got {global_number}")
        if global_number == 1 and gram_teacher_size:
            raise ValueError("gram_teacher_size needs both global crops (global_number=2)")
        self.global_number = global_number
        if local_number < 0:
            raise ValueError(f"local_number must be >= 0, got {local_number}")
        probabilities = [flip_probability, color_jitter_probability, grayscale_probability, solarize_probability,
                         *blur_probabilities]
        if len(blur_probabilities) != 3 or not all(0 <= p <= 1 for p in probabilities):
            raise ValueError(f"probabilities must lie in [0, 1] and blur_probabilities must hold 3 of them "
                             f"(global 1, global 2, local); got {probabilities}")
        if rotation_degrees < 0:
            raise ValueError(f"rotation_degrees must be >= 0, got {rotation_degrees}")
        self.global_size = global_size
        self.local_size = local_size
        self.local_number = local_number
        global_scale, local_scale = tuple(global_scale), tuple(local_scale)
        shared = SharedSteps(flip_probability, color_jitter_probability, grayscale_probability, rotation_degrees)
        blur_1, blur_2, blur_local = blur_probabilities
        self.global_transform_1 = _view_pipeline(global_size, global_scale, blur_1, 0.0, mean, std, shared, defer)
        self.global_transform_2 = _view_pipeline(global_size, global_scale, blur_2, solarize_probability, mean, std,
                                                 shared, defer)
        self.local_transform = _view_pipeline(local_size, local_scale, blur_local, 0.0, mean, std, shared, defer)
        self.gram_teacher_size = gram_teacher_size
        if gram_teacher_size:
            self.global_transform_1 = _ViewWithTeacherCrop(global_size, gram_teacher_size, global_scale, blur_1, 0.0,
                                                           mean, std, shared, defer)
            self.global_transform_2 = _ViewWithTeacherCrop(global_size, gram_teacher_size, global_scale, blur_2,
                                                           solarize_probability, mean, std, shared, defer)

    @property
    def num_views(self) -> int:
        return self.global_number + self.local_number + (2 if self.gram_teacher_size else 0)

    def __call__(self, image: Image.Image) -> list[torch.Tensor] | dict:
        """[global 1, global 2, locals...], then, with gram_teacher_size, the two global crops at that size.

        photometric_on="device": {"crops": those crops as uint8 pixels, "photometric": (V, NUM_PARAMS) parameters
        of their colour steps}, for ssd.data.deferred_photometric.apply_photometric on the training device."""
        views = self._views(image)
        if self.photometric_on == "loader":
            return views
        return {"crops": [pixels for pixels, _ in views], "photometric": torch.stack([params for _, params in views])}

    def _views(self, image: Image.Image) -> list:
        if not self.gram_teacher_size:
            crops = [self.global_transform_1(image)]
            if self.global_number == 2:
                crops.append(self.global_transform_2(image))
            crops.extend(self.local_transform(image) for _ in range(self.local_number))
            return crops
        (global_1, teacher_1), (global_2, teacher_2) = self.global_transform_1(image), self.global_transform_2(image)
        return [global_1, global_2, *(self.local_transform(image) for _ in range(self.local_number)),
                teacher_1, teacher_2]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global {self.global_number} x {self.global_size}px, local {self.local_number} x "
            f"{self.local_size}px)"
        )


def eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The standard evaluation view: shorter side to resize_size (bicubic), centre crop_size, normalise."""
    return v2.Compose(
        [v2.Resize(resize_size, interpolation=BICUBIC), v2.CenterCrop(crop_size)] + v2_normalize_steps(mean, std)
    )
