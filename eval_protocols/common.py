"""What the protocol commands share: command-line options, loading the backbone, features of a data split
(through the cache when asked), distributed set-up and JSON reports.

Imports of ssd's training-side modules stay inside functions so that ``knn_classify`` can be imported by any
code without pulling in the data or model stack.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch

from eval_protocols import reports
from eval_protocols.baselines import BASELINES, baseline_model, chosen_baselines, trained_name
from eval_protocols.subset import limit_dataset, subset_size
from ssd.data.datasets import DATASET_NAMES
from ssd.data.image_io import DEFAULT_MAX_IMAGE_PIXELS
from ssd.engine.distributed import rank_and_world


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and ends every option's help with its default, unless the help
    already says it (options whose default is None explain it in words: "default: what the weights record")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="run folder, ssd checkpoint (.pt file or .dcp folder), ssd export (folder or .safetensors), "
                                        "or an official DINO / DINOv2 .pth")
    parser.add_argument("--which", default="teacher", metavar="{teacher,student,<student name>}",
                        help="backbone to evaluate (DINO evaluates the teacher; a multi_distill run names each "
                        "student, the first by default)")
    group = parser.add_argument_group("architecture of official weights (ssd files record their own)")
    group.add_argument("--arch", default=None, help="timm name, e.g. vit_small_patch16_224, vit_small_patch14_dinov2 "
                                                    "(default: the architecture the weights record)")
    group.add_argument("--img-size", type=int, default=224, help="position-embedding grid size in pixels")
    group.add_argument("--patch-size", type=int, default=0, help="0 keeps the architecture's own")
    group.add_argument("--num-registers", type=int, default=0, help="register tokens of the official model")
    group.add_argument("--timm-kwargs", type=json.loads, default={},
                       help='JSON of extra timm arguments, e.g. \'{"init_values": 1e-5}\' for DINOv2')
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (named as in training: data.dataset, data.root, ...)")
    group.add_argument("--dataset", choices=DATASET_NAMES, default="imagefolder",
                       help="as data.dataset in training: digits (embedded, no --data-root), cifar10, imagefolder "
                            "(one sub-folder per class); folder (unlabelled) cannot be evaluated")
    group.add_argument("--data-root", default="",
                       help="as data.root in training: the data set folder, with train/ and test/ (or val/) "
                            "(default: none, which only digits needs)")
    group.add_argument("--train-split", default="train", help="split the classifier is fitted on (k-NN: the bank)")
    group.add_argument("--test-split", default="test", help="split accuracy is measured on, e.g. val for ImageNet")
    group.add_argument("--holdout-fraction", type=float, default=0.2,
                       help="as data.holdout_fraction: the share of digits in its test split (digits only)")
    group.add_argument("--limit", type=int, default=None,
                       help="at most this many images per split, taken class-balanced and seeded (--seed): a "
                            "smoke test in seconds (default: every image)")
    group.add_argument("--fraction", type=float, default=None,
                       help="this share of each split, class-balanced and seeded; with --limit the smaller "
                            "(default: every image)")
    group.add_argument("--resize", type=int, default=None,
                       help="shorter side before the centre crop (default: what the weights record, else 256)")
    group.add_argument("--crop", type=int, default=None,
                       help="centre crop size (default: what the weights record, else 224)")
    group.add_argument("--batch-size", type=int, default=128, help="images per process per step")
    group.add_argument("--num-workers", type=int, default=4, help="data loading processes")
    group.add_argument("--cache-dir", default=None,
                       help="keep extracted features here; reused only for the same weights, transform and data "
                            "(default: no cache)")
    group.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip",
                       help="an unreadable image is left out of the evaluation with a warning (skip; the report "
                            "counts them) or stops it (fail), as data.on_bad_image does in training")
    group.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="larger images are unreadable (decompression bombs), as data.max_image_pixels")


def add_report_args(parser: argparse.ArgumentParser, seeded: str) -> None:
    """Options every protocol shares beyond model and data: baselines, seed, output file."""
    parser.add_argument("--baselines", nargs="*", choices=tuple(BASELINES), default=None,
                        help="also evaluate the same architecture at random initialisation and/or raw pixels, "
                             "printed side by side with the weights; raw pixels are 3 x crop^2 numbers per image: "
                             "on large data sets add --limit (default: none; the option alone: both)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"seeds {seeded}")
    parser.add_argument("--output", default=None, help="JSON file for the results (default: print only)")


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
    args.which = info["which"]  # "student" for runs whose teacher was fixed (frozen or random)
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


def check_data_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse data options that cannot work with argparse's usage error (exit status 2), naming the fix."""
    if args.dataset == "folder":
        parser.error("--dataset folder is unlabelled (data.dataset=folder in training), and k-NN and linear probes "
                     "need labels: use --dataset imagefolder on a folder with one sub-folder per class")
    try:
        subset_size(1, args.limit, args.fraction)
    except ValueError as error:
        parser.error(str(error))


def build_split(args: argparse.Namespace, split: str):
    """The ``split`` data set the command names, cut to --limit / --fraction."""
    from ssd.data import build_dataset

    data = types.SimpleNamespace(dataset=args.dataset, root=args.data_root, split=split,
                                 holdout_fraction=args.holdout_fraction, max_image_pixels=args.max_image_pixels)
    return limit_dataset(build_dataset(data, split), args.limit, args.fraction, args.seed)


def subset_record(args: argparse.Namespace, datasets: dict) -> dict | None:
    """The --limit / --fraction record of a report; ``datasets`` maps "train" / "test" to built splits."""
    available = {name: len(getattr(dataset, "dataset", dataset)) for name, dataset in datasets.items()}
    return reports.subset_record(args.limit, args.fraction, args.seed, available)


def candidates(args: argparse.Namespace, backbone, info: dict) -> list[tuple[str, torch.nn.Module, dict]]:
    """``(name, model, identity)`` of the weights and of each --baselines entry; ``identity`` tells the feature
    cache one model from another."""
    from ssd.checkpoint_import import model_config

    found = [(trained_name(args.which), backbone, weights_identity(info["file"], args.which))]
    for kind in chosen_baselines(args.baselines):
        identity = {"baseline": kind}
        if kind == "random-init":
            identity.update(arch=info["model"], seed=args.seed)
        found.append((BASELINES[kind], baseline_model(kind, model_config(info["model"]), args.seed), identity))
    return found


def features_for_split(args, backbone, info: dict, dataset, split: str, kind: str = "pooled",
                       n_last_blocks: int = 4, identity: dict | None = None):
    """Features of ``dataset`` (the ``split`` of ``build_split``) with the centre-crop transform:
    ``(features, labels, readable)`` where features is a tensor for kind="pooled" and the dict of
    ``features.extract`` for kind="tokens"; ``readable`` (N,) is False for the unreadable images left out under
    --on-bad-image skip (their rows are to be dropped). ``identity`` names the model for the cache (default:
    the weights file)."""
    from eval_protocols.cache import cached_extract
    from ssd.data import eval_transform

    transform = eval_transform(args.resize, args.crop, info["mean"], info["std"])
    description = {"weights": identity or weights_identity(info["file"], args.which), "transform": repr(transform),
                   "data": {"dataset": args.dataset, "root": str(Path(args.data_root).resolve()), "split": split,
                            "images": len(dataset), "max_image_pixels": args.max_image_pixels,
                            "holdout_fraction": args.holdout_fraction,
                            "subset": [args.limit, args.fraction, args.seed]}}
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
    """What distinguishes one weights file from another without hashing gigabytes: path, size, mtime (of the
    files of a sharded checkpoint folder: their total size, the newest mtime)."""
    path = Path(path)
    stats = [file.stat() for file in path.iterdir()] if path.is_dir() else [path.stat()]
    return {"file": str(path.resolve()), "size": sum(s.st_size for s in stats),
            "mtime_ns": max(s.st_mtime_ns for s in stats), "which": which}


def report_header(args: argparse.Namespace, info: dict, protocol: str, datasets: dict) -> dict:
    """The shared first keys of a report (see ``reports``) for the command's weights and data."""
    return reports.header(
        protocol=protocol, weights=info["file"], which=args.which, step=info.get("step"),
        arch=info["model"]["arch"], resize=args.resize, crop=args.crop, dataset=args.dataset,
        data_root=args.data_root, train_split=args.train_split, test_split=args.test_split,
        subset=subset_record(args, datasets), on_bad_image=args.on_bad_image, max_image_pixels=args.max_image_pixels)


def write_json(path: str | Path, report: dict) -> None:
    from ssd.files import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
