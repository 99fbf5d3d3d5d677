"""Linear probing of a frozen backbone, with two protocols:

- grid (default): a DINOv2-style grid of linear heads (learning rates x n_last_blocks in {1, 4} x avgpool
  off/on) trained at once over one backbone pass per batch: SGD, momentum 0.9, no weight decay, cosine schedule
  per step. The winning setting is chosen on a validation part held out from the training split (10%,
  stratified, seeded), and only the winner is then evaluated on the test split: no choice sees the test split.
- dino: the single setting of DINO's eval_linear.py (Caron et al. 2021), so that figures compare with the
  paper's: SGD momentum 0.9, weight decay 0, lr 0.001 per 256 images (x global batch / 256; the paper's runs:
  8 GPUs x 128 = 1024), cosine to 0 stepped per epoch, 100 epochs, random-resized crop (0.08-1, bilinear) + flip
  for training, centre crop for testing; features: the class tokens of the last 4 blocks concatenated (DINO's
  choice for ViT-S; for ViT-B it uses --n-last-blocks 1 --avgpool on), no validation part. Differences: DINO
  prints the best test accuracy over its per-epoch evaluations, this reports the accuracy after the last
  epoch (no choice made on the test split); and --mode fast trains on one centre-crop view per image instead of
  a new augmented view per epoch, which usually costs some accuracy against the paper's figures.

Two modes, for both protocols:

- ``full``: random-resized crop + flip on every epoch, backbone run on every batch (as DINO does);
- ``fast``: centre-crop features extracted once (and cached with --cache-dir), heads trained on them.

Learning rates are given and reported per 256 images; the lr a head trains with is that x global batch / 256.

    python -m eval_protocols.linear checkpoints/my_run --dataset cifar10 --data-root ~/data/cifar10 \\
        --mode fast --baselines --output linear.json
    python -m eval_protocols.linear checkpoints/my_run --dataset imagefolder --data-root /data/imagenet \\
        --test-split val --protocol dino --batch-size 128   # on 8 GPUs: DINO's global batch 1024
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import torch

from eval_protocols import common, reports
from eval_protocols.features import block_count, drop_unreadable, extract, has_block_tokens
from eval_protocols.linear_heads import DEFAULT_LEARNING_RATES, LinearGrid, make_grid
from eval_protocols.linear_report import edge_warning, format_comparison, format_result
from eval_protocols.linear_training import (
    augmented_batches,
    cached_batches,
    count_distinct,
    score_single_head,
    select_and_test,
    split_train_val,
    take,
    train_grid,
    training_augmentation,
)
from eval_protocols.subset import Subset
from ssd.cli import run_command
from ssd.engine.distributed import rank_and_world

log = logging.getLogger(__name__)

PROTOCOLS = ("grid", "dino")
# DINO's eval_linear.py defaults (ViT-S): --lr 0.001 (per 256 images), --n_last_blocks 4, no avgpool.
DINO_LR, DINO_N_LAST_BLOCKS, DINO_AVGPOOL = 0.001, 4, "off"
AVGPOOL_CHOICES = {"both": (False, True), "on": (True,), "off": (False,)}


def resolve_protocol(args: argparse.Namespace) -> None:
    """Fill the grid options the user left out with the protocol's own; a fixed protocol takes one of each."""
    dino = args.protocol == "dino"
    args.lrs = args.lrs or ([DINO_LR] if dino else list(DEFAULT_LEARNING_RATES))
    args.n_last_blocks = args.n_last_blocks or ([DINO_N_LAST_BLOCKS] if dino else [1, 4])
    args.avgpool = args.avgpool or (DINO_AVGPOOL if dino else "both")
    if dino and (len(args.lrs) > 1 or len(args.n_last_blocks) > 1 or args.avgpool == "both"):
        raise ValueError("--protocol dino trains one head with no validation part to choose among several: give one "
                         "--lrs value, one --n-last-blocks value and --avgpool on or off (or use --protocol grid)")


def training_data(args, model, info: dict, train_dataset, identity: dict, n_blocks: int, device: torch.device):
    """``(epoch_batches, steps per epoch, processes sharing a batch, validation part or None, finish)``;
    ``finish()`` returns the training size and the skipped images once training has met every image."""
    if args.protocol == "dino":
        train_indices, val_indices = list(range(len(train_dataset))), []
    else:
        train_indices, val_indices = split_train_val(train_dataset.targets, args.val_fraction, args.seed)
    if args.mode == "fast":
        everything, labels, readable = common.features_for_split(args, model, info, train_dataset, args.train_split,
                                                                 "tokens", n_blocks, identity=identity)
        skipped = common.count_left_out(readable, args.train_split)
        # The split was made over all images, so an unreadable file moves no other image between the parts.
        train_indices = [i for i in train_indices if readable[i]]
        val_indices = [i for i in val_indices if readable[i]]
        val = (take(everything, val_indices), labels[val_indices]) if val_indices else None
        epoch_batches = cached_batches(take(everything, train_indices), labels[train_indices], args.batch_size,
                                       args.seed)
        steps = math.ceil(len(train_indices) / args.batch_size)
        # 1: every process holds all features and trains on them alone.
        return epoch_batches, steps, 1, val, lambda: (len(train_indices), skipped)
    from ssd.data import eval_transform

    val, skipped_val = None, 0
    if val_indices:
        center_crop = eval_transform(args.resize, args.crop, info["mean"], info["std"])
        val_outputs, val_labels, val_readable = extract(
            model, Subset(train_dataset, val_indices), center_crop, "tokens", n_blocks, args.batch_size,
            args.num_workers, device, on_bad_image=args.on_bad_image)
        val = drop_unreadable(val_outputs, val_labels, val_readable)
        skipped_val = common.count_left_out(val_readable, "validation part")
    augmentation = training_augmentation(args.crop, info["mean"], info["std"],
                                         "bilinear" if args.protocol == "dino" else "bicubic")
    epoch_batches, steps, unreadable = augmented_batches(model, train_dataset, train_indices, augmentation, args,
                                                         n_blocks, device)

    def finish():  # unreadable images of the training part are only met during training
        skipped_in_training = count_distinct(unreadable)
        return len(train_indices) - skipped_in_training, skipped_val + skipped_in_training
    return epoch_batches, steps, rank_and_world()[1], val, finish


def probe(args, model, info: dict, datasets: dict, identity: dict, device: torch.device) -> tuple[dict, dict, float]:
    """One candidate's probe: ``(result, sizes, lr_scale)``; result holds "grid" (a row per head), "best" (with
    its test accuracy) and, in grid mode, a "warning" when the best lr is on the edge of the grid."""
    depth = block_count(model) or None
    if depth and max(args.n_last_blocks) > depth:
        log.warning("the backbone has %d blocks: --n-last-blocks above %d use all %d", depth, depth, depth)
    settings = make_grid(args.lrs, args.n_last_blocks, AVGPOOL_CHOICES[args.avgpool], has_block_tokens(model), depth)
    n_blocks = max(s.n_last_blocks for s in settings)
    epoch_batches, steps, world_size, val, finish = training_data(args, model, info, datasets["train"], identity,
                                                                  n_blocks, device)
    test_outputs, test_labels, test_readable = common.features_for_split(
        args, model, info, datasets["test"], args.test_split, "tokens", n_blocks, identity=identity)
    test = drop_unreadable(test_outputs, test_labels, test_readable)
    skipped_test = common.count_left_out(test_readable, args.test_split)
    num_classes = max(len(datasets["train"].classes), int(test[1].max()) + 1)
    torch.manual_seed(args.seed)  # the heads' initialisation: the same for every candidate
    grid = LinearGrid(settings, take(test[0], [0]), num_classes)
    lr_scale = args.batch_size * world_size / 256  # lrs are per 256 images, as in DINO / DINOv2
    train_grid(grid, epoch_batches, args.epochs, steps, lr_scale, device,
               schedule="epoch" if args.protocol == "dino" else "step")
    train_size, skipped_train = finish()
    if args.protocol == "dino":
        result = score_single_head(grid, test, device, lr_scale)
    else:
        result = select_and_test(grid, val, test, device, lr_scale)
        result["warning"] = edge_warning(result, args.lrs)
    sizes = {"train_size": train_size, "val_size": 0 if val is None else len(val[1]), "test_size": len(test[1]),
             "skipped_images": {"train": skipped_train, "test": skipped_test}}
    return result, sizes, lr_scale


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval_protocols.linear", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    common.add_model_args(parser)
    common.add_data_args(parser)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grid",
                        help="grid: many settings, the best on a validation part; dino: DINO's single setting")
    parser.add_argument("--mode", choices=("full", "fast"), default="full",
                        help="full: augmented images every epoch (DINO); fast: train on centre-crop features")
    parser.add_argument("--epochs", type=int, default=100, help="DINO trains linear heads for 100 epochs")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="peak learning rates per 256 images, scaled by global batch / 256 (default: grid: "
                             f"{' '.join(f'{lr:g}' for lr in DEFAULT_LEARNING_RATES)}; dino: {DINO_LR:g})")
    parser.add_argument("--n-last-blocks", type=int, nargs="+", default=None,
                        help="class tokens of this many last blocks, concatenated (default: grid: 1 4; dino: 4)")
    parser.add_argument("--avgpool", choices=tuple(AVGPOOL_CHOICES), default=None,
                        help="append the mean patch token (default: grid: both; dino: off)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the training split held out to choose the setting (grid only)")
    common.add_report_args(parser, seeded="the --limit / --fraction subset, the random-init baseline, the "
                                          "validation part, the heads' initialisation and the batch order")
    args = parser.parse_args(argv)
    common.check_data_args(parser, args)
    try:
        resolve_protocol(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common.init_distributed()
    device = common.default_device(args.device)
    backbone, info = common.load_backbone(args)
    datasets = {"train": common.build_split(args, args.train_split), "test": common.build_split(args, args.test_split)}
    results, sizes, lr_scale = {}, None, None
    for name, model, identity in common.candidates(args, backbone, info):
        results[name], candidate_sizes, lr_scale = probe(args, model, info, datasets, identity, device)
        sizes = sizes or candidate_sizes  # the same images for every candidate
    if not common.is_main_process():
        return {}
    for name, result in results.items():
        print(format_result(name, result, args.protocol, lr_scale))
    if len(results) > 1:
        print(format_comparison(results))
    report = {**common.report_header(args, info, "linear", datasets), **sizes, "linear_protocol": args.protocol,
              "mode": args.mode, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr_scale": lr_scale, "val_fraction": args.val_fraction if args.protocol == "grid" else None,
              "seed": args.seed, "results": results, "date": reports.now()}
    if args.output:
        common.write_json(args.output, report)
        print(f"results written to {args.output}")
    return report


def cli() -> int:
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
