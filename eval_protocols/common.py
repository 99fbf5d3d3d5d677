"""What the protocol commands share: command-line options, loading the backbone, features of a data split
(through the cache when asked), distributed set-up and JSON reports.

Imports of ssd's training-side modules stay inside functions so that ``knn_classify`` can be imported by any
code without pulling in the data or model stack.
"""

from __future__ import annotations

import argparse
import datetime
import json
import types
from pathlib import Path

import torch

from ssd.data.image_io import DEFAULT_MAX_IMAGE_PIXELS
from ssd.engine.distributed import rank_and_world


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="run folder, ssd checkpoint (.pt), ssd export (folder or .safetensors), "
                                        "or an official DINO / DINOv2 .pth")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="backbone to evaluate (DINO evaluates the teacher)")
    group = parser.add_argument_group("architecture of official weights (ssd files record their own)")
    group.add_argument("--arch", default=None, help="timm name, e.g. vit_small_patch16_224, vit_small_patch14_dinov2")
    group.add_argument("--img-size", type=int, default=224, help="position-embedding grid size in pixels")
    group.add_argument("--patch-size", type=int, default=0, help="0 keeps the architecture's own")
    group.add_argument("--num-registers", type=int, default=0)
    group.add_argument("--timm-kwargs", type=json.loads, default={},
                       help='JSON of extra timm arguments, e.g. \'{"init_values": 1e-5}\' for DINOv2')
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="imagefolder", help="digits | cifar10 | imagefolder")
    group.add_argument("--data-root", default="", help="data set folder (with train/ and test/ or val/)")
    group.add_argument("--train-split", default="train")
    group.add_argument("--test-split", default="test", help="e.g. val for ImageNet")
    group.add_argument("--resize", type=int, default=None,
                       help="shorter side before the centre crop (default: what the weights record, else 256)")
    group.add_argument("--crop", type=int, default=None,
                       help="centre crop size (default: what the weights record, else 224)")
    group.add_argument("--batch-size", type=int, default=128, help="images per process per step")
    group.add_argument("--num-workers", type=int, default=4)
    group.add_argument("--cache-dir", default=None,
                       help="keep extracted features here; reused only for the same weights, transform and data")
    group.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip",
                       help="an unreadable image is left out of the evaluation with a warning (skip; the report "
                            "counts them) or stops it (fail), as data.on_bad_image does in training")
    group.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="larger images are unreadable (decompression bombs), as data.max_image_pixels")


def init_distributed() -> None:
    """Join the process group when started by torchrun / SLURM (WORLD_SIZE > 1); no-op otherwise."""
    from ssd.engine.distributed import init_distributed as init

    init("auto")


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def load_backbone(args: argparse.Namespace):
    """``(backbone, info)`` for the command's weights; ``info`` has the model config, mean, std and file."""
    from ssd.checkpoint_import import load_backbone_for_eval

    official = None
    if args.arch:
        official = {"arch": args.arch, "img_size": args.img_size, "patch_size": args.patch_size,
                    "num_registers": args.num_registers, "timm_kwargs": args.timm_kwargs, "drop_path_rate": 0.0}
    backbone, info = load_backbone_for_eval(args.weights, args.which, official)
    if hasattr(args, "resize"):
        resolve_sizes(args, info)
    return backbone, info


DEFAULT_RESIZE, DEFAULT_CROP = 256, 224


def resolve_sizes(args: argparse.Namespace, info: dict) -> None:
    """Input sizes the user did not give come from the weights (a run's eval.resize_size / crop_size, an export's
    input size and crop fraction): a 32 px model is evaluated at 32 px, not silently at 224. Says what it uses."""
    recorded = info.get("crop") is not None
    args.resize = args.resize or info.get("resize") or DEFAULT_RESIZE
    args.crop = args.crop or info.get("crop") or DEFAULT_CROP
    step = f", step {info['step']}" if info.get("step") is not None else ""
    source = "as the weights record" if recorded else "defaults: the weights record no size"
    if is_main_process():
        print(f"evaluating the {args.which} of {info['file']}{step} ({info['model']['arch']}) at resize "
              f"{args.resize} / crop {args.crop} ({source}), mean {list(info['mean'])}, std {list(info['std'])}")


def build_split(args: argparse.Namespace, split: str):
    from ssd.data import build_dataset

    data = types.SimpleNamespace(dataset=args.dataset, root=args.data_root, split=split,
                                 max_image_pixels=args.max_image_pixels)
    return build_dataset(data, split)


def features_for_split(args, backbone, info: dict, split: str, kind: str = "pooled", n_last_blocks: int = 4):
    """Features of a split with the centre-crop transform: ``(features, labels, readable)`` where features is a
    tensor for kind="pooled" and the dict of ``features.extract`` for kind="tokens"; ``readable`` (N,) is False
    for the unreadable images left out under --on-bad-image skip (their rows are to be dropped)."""
    from eval_protocols.cache import cached_extract
    from ssd.data import eval_transform

    transform = eval_transform(args.resize, args.crop, info["mean"], info["std"])
    dataset = build_split(args, split)
    description = {"weights": weights_identity(info["file"], args.which), "transform": repr(transform),
                   "data": {"dataset": args.dataset, "root": str(Path(args.data_root).resolve()), "split": split,
                            "images": len(dataset), "max_image_pixels": args.max_image_pixels}}
    outputs, labels, readable = cached_extract(
        args.cache_dir, description, backbone, dataset, transform, kind=kind, n_last_blocks=n_last_blocks,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
        on_bad_image=args.on_bad_image,
    )
    return (outputs["pooled"] if kind == "pooled" else outputs), labels, readable


def count_left_out(readable: torch.Tensor, split: str) -> int:
    """How many images of ``split`` were unreadable and left out; an error when nothing is left."""
    left_out = int((~readable).sum())
    if left_out == len(readable):
        raise RuntimeError(f"all {left_out} images of the {split} split are unreadable (see the warnings above)")
    if left_out:
        print(f"{split}: {left_out} unreadable image(s) left out of the evaluation (named in the warnings above)")
    return left_out


def weights_identity(path: str | Path, which: str) -> dict:
    """What distinguishes one weights file from another without hashing gigabytes: path, size, mtime."""
    stat = Path(path).stat()
    return {"file": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "which": which}


def report_header(args: argparse.Namespace, info: dict, **sizes) -> dict:
    return {
        "weights": info["file"], "which": args.which, "arch": info["model"]["arch"],
        "dataset": args.dataset, "data_root": args.data_root, "train_split": args.train_split,
        "test_split": args.test_split, "resize": args.resize, "crop": args.crop, "on_bad_image": args.on_bad_image,
        "max_image_pixels": args.max_image_pixels, **sizes,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_json(path: str | Path, report: dict) -> None:
    from ssd.files import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
