"""Visual checks of a backbone: what DINO and DINOv2 show in their papers.

- the last block's attention from the CLS token to every patch, one map per head (DINO, Fig. 1), for ViTs
  (timm VisionTransformer and Eva, the DINOv3 RoPE models); other backbones (ResNet, ConvNeXt) have none;
- a 3-component PCA of the patch features shown as RGB, fitted over all images together (DINOv2, Fig. 1);
  for a CNN, of its last feature map.

Maps are computed at the model's own input size (the run's eval resize / crop, an export's input size), then
enlarged nearest-neighbour so that every patch stays a sharp square: a 32 px digit with 8 px patches is drawn
at 224 px. Each tile is labelled (image name, head, PCA), each picture with its weights and step.

    python -m ssd.visualize checkpoints/my_run img1.jpg img2.jpg --output visuals/

writes visuals/attention_<weights>_step<N>.png (a row per image: the image, then one map per head) and
visuals/pca_<weights>_step<N>.png (image | PCA). log.images_every_steps=N draws the same pictures of a few
fixed training images into TensorBoard while a run trains (see ``TrainingImages``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

from ssd.cli import run_command

DISPLAY_SIZE = 224  # shorter side of a drawn tile, at least; small inputs are enlarged by a whole factor
PADDING = 2
TITLE_HEIGHT = 16


def has_attention(backbone) -> bool:
    return isinstance(backbone, (VisionTransformer, Eva))


def _patch_grid(backbone, images: torch.Tensor) -> tuple[int, int]:
    return tuple(backbone.patch_embed.dynamic_feat_size(images.shape[-2:]))


@torch.no_grad()
def cls_attention(backbone, images: torch.Tensor) -> torch.Tensor:
    """Last block's CLS-to-patch attention, (B, heads, h, w); registers are left out, each map sums to <= 1."""
    if not has_attention(backbone):
        raise TypeError(f"{type(backbone).__name__} has no attention: attention maps need a ViT (timm "
                        "VisionTransformer or Eva); the PCA of its feature map (pca_rgb) still works")
    attention = backbone.blocks[-1].attn
    captured = []
    # The fused kernel never materialises the weights. The unfused path (same maths, RoPE included for Eva)
    # passes them through attn_drop, an identity in eval mode, where a hook reads them.
    fused = attention.fused_attn
    attention.fused_attn = False
    handle = attention.attn_drop.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        # forward_features, not the module's call: a module compiled for training (train.compile) would compile
        # this one-off pass again; its methods stay plain Python.
        backbone.eval().forward_features(images)
    finally:
        handle.remove()
        attention.fused_attn = fused
    weights = captured[0]  # (B, heads, N, N), N = prefix tokens + patches
    h, w = _patch_grid(backbone, images)
    return weights[:, :, 0, backbone.num_prefix_tokens:].reshape(len(images), -1, h, w)


@torch.no_grad()
def patch_features(backbone, images: torch.Tensor) -> torch.Tensor:
    """The last layer's features on the patch grid, (B, D, h, w): a ViT's patch tokens (CLS and registers left
    out) or a CNN's last feature map."""
    features = backbone.eval().forward_features(images)
    if features.dim() == 4:
        # Most timm CNNs give (B, C, h, w); a few (Swin, some ConvNeXt variants) give channels last.
        channels_last = features.shape[-1] == backbone.num_features and features.shape[1] != backbone.num_features
        return features.permute(0, 3, 1, 2) if channels_last else features
    if features.dim() != 3 or not has_attention(backbone):
        raise TypeError(f"{type(backbone).__name__}.forward_features gives shape {tuple(features.shape)}, neither "
                        "ViT tokens nor a feature map: no PCA picture for it")
    h, w = _patch_grid(backbone, images)
    patches = features[:, backbone.num_prefix_tokens:]  # (B, h*w, D)
    return patches.transpose(1, 2).reshape(len(images), -1, h, w)


@torch.no_grad()
def pca_rgb(backbone, images: torch.Tensor) -> torch.Tensor:
    """Patch features projected on their 3 first principal components (fitted on all images at once, so
    colours are comparable across images), each scaled to [0, 1]: (B, 3, h, w)."""
    features = patch_features(backbone, images).float()  # (B, D, h, w)
    batch, dim, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
    flat = flat - flat.mean(dim=0)
    _, _, components = torch.linalg.svd(flat, full_matrices=False)  # rows of components: principal axes
    projected = flat @ components[:3].T  # (B*h*w, <=3): fewer when a 1x1 map leaves fewer samples
    projected = F.pad(projected, (0, 3 - projected.shape[1]))
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    projected = (projected - low) / (high - low).clamp_min(1e-8)
    return projected.reshape(batch, h, w, 3).permute(0, 3, 1, 2)


def displayable(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Normalised model inputs back to [0, 1] (with mean/std), or min-max scaled per image without them."""
    if mean is not None and std is not None:
        images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        return images.clamp(0, 1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8)


def _nearest(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps, size=tuple(size), mode="nearest")  # nearest: one sharp square per patch


def attention_tiles(backbone, images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """(B, 1 + heads, 3, H, W) in [0, 1]: each image, then each head's map scaled to [0, 1] per map."""
    maps = cls_attention(backbone, images).float().cpu()  # (B, heads, h, w)
    low = maps.amin(dim=(2, 3), keepdim=True)
    maps = (maps - low) / (maps.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-12)
    maps = _nearest(maps, images.shape[-2:]).unsqueeze(2).expand(-1, -1, 3, -1, -1)
    return torch.cat([displayable(images.float().cpu(), mean, std).unsqueeze(1), maps], dim=1)


def pca_tiles(backbone, images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """(B, 2, 3, H, W) in [0, 1]: each image, then its patch-feature PCA as RGB."""
    colours = _nearest(pca_rgb(backbone, images).cpu(), images.shape[-2:])
    return torch.stack([displayable(images.float().cpu(), mean, std), colours], dim=1)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """``text`` cut from the left (a path's end says most) until it fits ``width`` pixels."""
    while text and draw.textlength(text) > width:
        text = "..." + text[4:]
    return text


def _label(draw: ImageDraw.ImageDraw, corner: tuple[int, int], text: str, width: int) -> None:
    """White text on a black box, readable on a white digit as on a dark attention map."""
    text = _fit_text(draw, text, width - 4)
    box = draw.textbbox((corner[0] + 2, corner[1] + 1), text)
    draw.rectangle((corner[0], corner[1], box[2] + 2, box[3] + 2), fill="black")
    draw.text((corner[0] + 2, corner[1] + 1), text, fill="white")


def labelled_picture(tiles: torch.Tensor, labels: list[list[str]], title: str,
                     display_size: int = DISPLAY_SIZE) -> Image.Image:
    """A grid of ``tiles`` (rows, columns, 3, H, W) in [0, 1], enlarged by a whole factor so that the shorter
    side reaches ``display_size``, each tile labelled, ``title`` above."""
    rows, columns = tiles.shape[:2]
    factor = max(1, math.ceil(display_size / min(tiles.shape[-2:])))
    enlarged = F.interpolate(tiles.flatten(0, 1), scale_factor=factor, mode="nearest")
    grid = to_pil_image(make_grid(enlarged, nrow=columns, padding=PADDING, pad_value=1.0))
    picture = Image.new("RGB", (grid.width, grid.height + TITLE_HEIGHT), "white")
    picture.paste(grid, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(picture)
    draw.text((PADDING, 2), _fit_text(draw, title, grid.width - 2 * PADDING), fill="black")
    height, width = enlarged.shape[-2:]
    for row in range(rows):
        for column in range(columns):
            corner = (PADDING + column * (width + PADDING), TITLE_HEIGHT + PADDING + row * (height + PADDING))
            _label(draw, corner, labels[row][column], width)
    return picture


def attention_picture(backbone, images, names: list[str], title: str, mean=None, std=None,
                      display_size: int = DISPLAY_SIZE) -> Image.Image:
    tiles = attention_tiles(backbone, images, mean, std)
    labels = [[name] + [f"head {head}" for head in range(tiles.shape[1] - 1)] for name in names]
    return labelled_picture(tiles, labels, f"CLS attention, last block | {title}", display_size)


def pca_picture(backbone, images, names: list[str], title: str, mean=None, std=None,
                display_size: int = DISPLAY_SIZE) -> Image.Image:
    labels = [[name, "PCA"] for name in names]
    return labelled_picture(pca_tiles(backbone, images, mean, std), labels, f"patch PCA | {title}", display_size)


def pictures(backbone, images, names, title, mean=None, std=None, display_size=DISPLAY_SIZE) -> dict:
    """``{"attention": picture, "pca": picture}``; no attention entry for a backbone without attention."""
    drawn = {"pca": pca_picture(backbone, images, names, title, mean, std, display_size)}
    if has_attention(backbone):
        drawn["attention"] = attention_picture(backbone, images, names, title, mean, std, display_size)
    return drawn


def log_to_tensorboard(writer, backbone, images: torch.Tensor, step: int, mean=None, std=None,
                       names: list[str] | None = None, title: str = "", tag: str = "visual") -> list[str]:
    """Log the attention and PCA pictures of ``images`` (normalised model inputs, (B, 3, H, W)) at ``step``;
    returns the tags written. The backbone is put in eval mode for the pass and given back in its mode."""
    was_training = backbone.training
    names = names or [f"image {index}" for index in range(len(images))]
    try:
        images = images.to(next(backbone.parameters()).device)
        drawn = pictures(backbone, images, names, title or f"step {step}", mean, std)
    finally:
        backbone.train(was_training)
    tags = {"attention": f"{tag}/cls_attention", "pca": f"{tag}/patch_pca"}
    for kind, picture in drawn.items():
        writer.add_image(tags[kind], pil_to_tensor(picture), step)  # uint8 (3, H, W)
    return [tags[kind] for kind in drawn]


class TrainingImages:
    """A few fixed training images (evenly spread indices), through the eval transform at the run's eval sizes,
    drawn into TensorBoard every ``log.images_every_steps`` steps and at the last step.

    Reading the images and drawing them uses no random number generator, and the backbone runs in eval mode
    without gradients, so a run with images trains exactly as one without.
    """

    def __init__(self, cfg, dataset):
        from ssd.data import UnreadableImageError, eval_transform

        self.mean, self.std = tuple(cfg.data.mean), tuple(cfg.data.std)
        transform = eval_transform(cfg.eval.resize_size, cfg.eval.crop_size, self.mean, self.std)
        count = min(int(cfg.log.images_count), len(dataset))
        images, self.names = [], []
        for index in sorted({position * len(dataset) // count for position in range(count)}):
            try:
                image, _ = dataset.load(index)
            except UnreadableImageError:
                continue  # another fixed image will do; the data loader reports unreadable files itself
            images.append(transform(image))
            self.names.append(dataset.describe(index))
        self.images = torch.stack(images) if images else None

    def log(self, writer, backbone, step: int) -> None:
        if self.images is None:  # none of the chosen images was readable
            return
        log_to_tensorboard(writer, backbone, self.images, step, self.mean, self.std, self.names,
                           title=f"step {step}")


# ---- command line ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from eval_protocols.common import HelpFormatter, add_model_args

    parser = argparse.ArgumentParser(prog="python -m ssd.visualize", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_model_args(parser)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--output", default="visuals", help="folder for the attention_*.png and pca_*.png pictures")
    parser.add_argument("--out", dest="output", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # older spelling
    parser.add_argument("--resize", type=int, default=None,
                        help="shorter side before the centre crop (default: what the weights record, else 256)")
    parser.add_argument("--crop", type=int, default=None,
                        help="centre crop, the model's input size (default: what the weights record, else 224)")
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)  # older spelling: resize = crop
    parser.add_argument("--display-size", type=int, default=DISPLAY_SIZE,
                        help="tiles are enlarged (nearest neighbour, by a whole factor) to at least this many pixels")
    return parser


def weights_title(info: dict, which: str) -> tuple[str, str]:
    """``(title, file stem)`` naming the weights: run or export folder, teacher/student, step."""
    path = Path(info["file"])
    export = path.suffix == ".safetensors"
    # A checkpoint or an export is known by its folder (the run's name); official weights by their file.
    name = path.parent.name if export or path.name.startswith("checkpoint_") else path.stem
    step = info.get("step")
    title = f"{'export' if export else which} {path.parent.name}/{path.name}"
    title += f", step {step}" if step is not None else ""
    stem = "_".join([name] + ([] if export else [which]) + ([f"step{step}"] if step is not None else []))
    return title, re.sub(r"[^A-Za-z0-9._-]+", "-", stem)


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    from eval_protocols.common import default_device, load_backbone
    from ssd.data import eval_transform, load_rgb

    args.resize, args.crop = args.resize or args.size, args.crop or args.size
    backbone, info = load_backbone(args)  # fills in --resize / --crop from the weights and says which it uses
    transform = eval_transform(args.resize, args.crop, info["mean"], info["std"])
    images = torch.stack([transform(load_rgb(path)) for path in args.images])
    backbone = backbone.to(default_device(args.device))
    title, stem = weights_title(info, args.which)
    title += f", input {args.crop} px"
    if not has_attention(backbone):
        print(f"{info['model']['arch']} ({type(backbone).__name__}) is not a ViT and has no attention: no attention "
              "maps; the PCA picture shows its last feature map")
    drawn = pictures(backbone, images.to(next(backbone.parameters()).device), [Path(p).name for p in args.images],
                     title, info["mean"], info["std"], args.display_size)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, picture in sorted(drawn.items()):
        written.append(output / f"{kind}_{stem}.png")
        picture.save(written[-1])
    print("wrote " + ", ".join(str(path) for path in written))
    return written


def cli() -> int:
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
