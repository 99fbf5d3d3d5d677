"""Robust image loading: every readable image becomes an RGB PIL image, every unreadable one a clear error.

Pretraining runs read millions of files; one bad file must either be reported by name (and skipped by the
caller, see `SeededCropsDataset`) or stop the run with a message that names it. Nothing here changes PIL's
global settings: `ImageFile.LOAD_TRUNCATED_IMAGES` stays False so a truncated file is an error, not an image
with a grey bottom half.

EXIF orientation is not applied, as in torchvision's and timm's folder loaders, so pixels match theirs.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Transparent pixels are composited on white: web images with alpha (logos, product shots, icons) are drawn
# to be seen on a white page, while the RGB values stored under alpha=0 are often black or leftover garbage.
ALPHA_BACKGROUND = (255, 255, 255)

# Same default as data.max_image_pixels: a few hundred bytes of PNG can decode to gigabytes, so sizes are
# checked from the header before decoding. ImageNet's largest image is about 20 megapixels. PIL's own
# Image.MAX_IMAGE_PIXELS still applies on top (it refuses above twice its value); it is left untouched.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class UnreadableImageError(Exception):
    """An image file that PIL cannot open or decode (missing, truncated, corrupt, not an image), or one too
    large to decode safely (above max_pixels)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def is_image_file(name: str | os.PathLike) -> bool:
    """True for a visible file whose extension is one of IMAGE_EXTENSIONS (case-insensitive)."""
    base = os.path.basename(os.fspath(name))
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, fully decode and convert one image to 8-bit RGB; raise UnreadableImageError if impossible or if
    the image has more than `max_pixels` pixels (checked before any pixel is decoded)."""
    try:
        with Image.open(path) as image:
            # Image.open only parses the header, so the size is known before load() allocates the pixels.
            _check_size(path, image, max_pixels)
            # load() decodes the pixels, which is where a truncated or corrupt file fails. Do it here, inside
            # the try, not later in a transform.
            image.load()
            return _to_rgb(image)
    except UnreadableImageError:
        raise
    # PIL reports bad data with many exception types (OSError, ValueError, SyntaxError, struct.error,
    # zlib.error, DecompressionBombError, ...); for a data loader they all mean "this file is unusable".
    except Exception as error:
        raise UnreadableImageError(path, f"{type(error).__name__}: {error}") from error


def _check_size(path: str | os.PathLike, image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise UnreadableImageError(
            path, f"the image is {width} x {height} = {width * height} pixels, above the limit of {max_pixels} "
            "(data.max_image_pixels, or --max-image-pixels in evaluation); raise it if such images are intended"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB. Always returns a new image, independent of the opened file."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG/TIFF). PIL's own convert("L") clips at 255 instead of scaling, which turns
        # most 16-bit images white, so scale 0..65535 -> 0..255 here. Mode "I" (32-bit) is treated the same
        # way because PIL also uses it for 16-bit PNGs on some versions.
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        # Float images have no standard range (depth, remote sensing, [0, 1] or raw values): stretch each
        # image to the full 0..255 range, as image viewers do, rather than guess a range (maybe all black).
        values = np.asarray(image, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = np.round((values - low) * scale).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    # "transparency" in info: P, L or RGB images with a transparent palette index or colour (PNG tRNS, GIF).
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    # L, 1, P without transparency, CMYK, YCbCr, ... : PIL knows the conversion (a mode it cannot convert
    # raises ValueError, reported by load_rgb as unreadable).
    return image.convert("RGB")
