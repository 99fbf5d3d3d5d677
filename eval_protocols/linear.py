"""Linear probing of a frozen backbone: the DINO protocol with a DINOv2-style grid, and honest model selection.

A grid of linear heads (learning rates x n_last_blocks in {1, 4} x avgpool on/off) is trained at once over
one backbone pass per batch: SGD, momentum 0.9, no weight decay, cosine schedule. The winning setting is
chosen on a validation split held out from the training set (10%, stratified, seeded), and only the winner is
then evaluated on the test split. Two modes:

- ``full``: random-resized-crop + flip on every epoch, backbone run on every batch (the DINO protocol);
- ``fast``: centre-crop features extracted once (and cached with --cache-dir), heads trained on them.

    python -m eval_protocols.linear checkpoints/my_run --dataset cifar10 --data-root ~/data/cifar10 \\
        --resize 32 --crop 32 --mode fast --output linear.json
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from eval_protocols import common
from eval_protocols.features import (
    TransformedDataset,
    autocast_for,
    backbone_outputs,
    drop_unreadable,
    extract,
    has_block_tokens,
)
from eval_protocols.linear_heads import (
    DEFAULT_LEARNING_RATES,
    LinearGrid,
    count_correct,
    make_grid,
)
from ssd.cli import run_command
from ssd.engine.distributed import is_distributed, rank_and_world

log = logging.getLogger(__name__)


def split_train_val(labels, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the training and validation parts, stratified by class so that every class is in both."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    indices, labels = list(range(len(labels))), [int(label) for label in labels]
    try:
        train, val = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single image cannot be in both parts: fall back to a plain split
        train, val = train_test_split(indices, test_size=val_fraction, random_state=seed)
    return sorted(train), sorted(val)


class Subset:
    """An ssd dataset restricted to ``indices`` (same ``load`` / ``describe`` interface)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        self.targets = [dataset.targets[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.dataset.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.dataset.describe(self.indices[index])


def take(outputs: dict, indices) -> dict:
    indices = torch.as_tensor(indices, dtype=torch.long)
    return {name: value[indices] for name, value in outputs.items()}


def cached_batches(outputs: dict, labels: torch.Tensor, batch_size: int, seed: int):
    """Per epoch, shuffled mini-batches of precomputed features (a different, seeded order each epoch)."""
    def epoch_batches(epoch: int):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            yield take(outputs, chosen), labels[chosen]
    return epoch_batches


def augmented_batches(backbone, dataset, indices, args, info: dict, n_last_blocks: int, device: torch.device):
    """Per epoch, freshly augmented images run through the frozen backbone (the full DINO protocol).

    Returns ``(epoch_batches, steps per epoch, unreadable)``: rows of unreadable images are dropped from their
    batch (which may become empty) and their dataset indices collected in the set ``unreadable``."""
    transform = v2.Compose([
        v2.RandomResizedCrop(args.crop, interpolation=v2.InterpolationMode.BICUBIC), v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(info["mean"], info["std"]),
    ])
    view = TransformedDataset(dataset, transform, indices, args.on_bad_image)
    distributed = is_distributed()
    sampler = (torch.utils.data.DistributedSampler(view, seed=args.seed) if distributed
               else torch.utils.data.RandomSampler(view, generator=torch.Generator().manual_seed(args.seed)))
    loader = DataLoader(view, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        drop_last=len(view) >= args.batch_size, pin_memory=device.type == "cuda")
    backbone.eval().to(device)
    unreadable: set[int] = set()

    def epoch_batches(epoch: int):
        if distributed:
            sampler.set_epoch(epoch)
        for images, labels, indices, readable in loader:
            unreadable.update(indices[~readable].tolist())
            with torch.no_grad(), autocast_for(device):
                outputs = backbone_outputs(backbone, images.to(device, non_blocking=True), "tokens", n_last_blocks)
            readable = readable.to(device)
            yield {k: v.float()[readable] for k, v in outputs.items()}, labels.to(device)[readable]
    return epoch_batches, len(loader), unreadable


def count_distinct(indices: set[int]) -> int:
    """How many distinct indices all processes together hold (one image can be met on several processes)."""
    if not is_distributed():
        return len(indices)
    gathered = [None] * rank_and_world()[1]
    dist.all_gather_object(gathered, sorted(indices))
    return len(set().union(*gathered))


def train_grid(grid: LinearGrid, epoch_batches, epochs: int, steps_per_epoch: int, lr_scale: float,
               device: torch.device) -> None:
    """SGD (momentum 0.9, no weight decay) on the summed losses of all heads, cosine-annealed to 0 per step."""
    grid.to(device).train()
    distributed = is_distributed()
    model = torch.nn.parallel.DistributedDataParallel(grid) if distributed else grid
    optimizer = torch.optim.SGD(grid.param_groups(lr_scale), momentum=0.9, weight_decay=0.0)
    total_steps, step = max(1, epochs * steps_per_epoch), 0
    for epoch in range(epochs):
        losses = []
        for outputs, labels in epoch_batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * group["peak_lr"] * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            outputs, labels = {k: v.to(device) for k, v in outputs.items()}, labels.to(device)
            # A sum over the batch, not a mean: a batch left empty by unreadable images gives 0, not NaN, and
            # still steps with every other process (DDP needs every process in every step).
            loss = sum(F.cross_entropy(logits, labels, reduction="sum") for logits in model(outputs))
            loss = loss / max(len(labels), 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item() / len(grid.heads))
            step += 1
        if losses and (epoch + 1) % max(1, epochs // 10) == 0:
            log.info("epoch %d/%d: mean loss per head %.4f", epoch + 1, epochs, sum(losses) / len(losses))


@torch.no_grad()
def evaluate(grid: LinearGrid, outputs: dict, labels: torch.Tensor, device: torch.device,
             heads: list[int] | None = None, batch_size: int = 1024) -> list[dict]:
    """Top-1 / top-5 (percent) of the chosen heads (all by default) on precomputed features."""
    grid.to(device).eval()
    heads = list(range(len(grid.heads))) if heads is None else heads
    correct = torch.zeros(len(heads), 2, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in outputs.items()}
        batch_labels = labels[start:start + batch_size].to(device)
        all_logits = grid(batch)
        for row, head in enumerate(heads):
            correct[row, 0] += count_correct(all_logits[head], batch_labels, 1)
            correct[row, 1] += count_correct(all_logits[head], batch_labels, 5)
    return [{"top1": 100.0 * c[0].item() / len(labels), "top5": 100.0 * c[1].item() / len(labels)} for c in correct]


def select_and_test(grid: LinearGrid, val: tuple, test: tuple, device: torch.device) -> dict:
    """Validation accuracy of every head; the best head (first on ties) alone is then run on the test split."""
    val_results = evaluate(grid, *val, device)
    best = max(range(len(val_results)), key=lambda i: (val_results[i]["top1"], -i))
    test_result = evaluate(grid, *test, device, heads=[best])[0]
    rows = [{**setting.as_dict(), "val_top1": r["top1"], "val_top5": r["top5"]}
            for setting, r in zip(grid.settings, val_results)]
    return {"grid": rows, "best": {**rows[best], "test_top1": test_result["top1"], "test_top5": test_result["top5"]}}


def format_table(report: dict) -> str:
    lines = [f"{'setting':<34} {'val top-1':>9}"]
    lines += [f"{row['name']:<34} {row['val_top1']:9.2f}" for row in report["grid"]]
    best = report["best"]
    lines.append(f"best on validation: {best['name']} -> test top-1 {best['test_top1']:.2f}, "
                 f"top-5 {best['test_top5']:.2f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval_protocols.linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    common.add_data_args(parser)
    parser.add_argument("--mode", choices=("full", "fast"), default="full",
                        help="full: augmented images every epoch (DINO); fast: train on centre-crop features")
    parser.add_argument("--epochs", type=int, default=100, help="DINO trains linear heads for 100 epochs")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LEARNING_RATES),
                        help="peak learning rates per 256 images (scaled by the global batch size)")
    parser.add_argument("--n-last-blocks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--avgpool", choices=("both", "on", "off"), default="both")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the training split held out")
    parser.add_argument("--seed", type=int, default=0, help="seeds the validation split and the batch order")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common.init_distributed()
    torch.manual_seed(args.seed)  # the heads' initialisation
    device = common.default_device(args.device)
    backbone, info = common.load_backbone(args)
    settings = make_grid(args.lrs, args.n_last_blocks, {"both": (False, True), "on": (True,), "off": (False,)}
                         [args.avgpool], has_tokens=has_block_tokens(backbone))
    n_blocks = max(s.n_last_blocks for s in settings)
    train_dataset = common.build_split(args, args.train_split)
    train_indices, val_indices = split_train_val(train_dataset.targets, args.val_fraction, args.seed)
    world_size = rank_and_world()[1]
    if args.mode == "fast":
        everything, labels, readable = common.features_for_split(args, backbone, info, args.train_split, "tokens",
                                                                 n_blocks)
        skipped_train = common.count_left_out(readable, args.train_split)
        # The split was made over all images, so an unreadable file moves no other image between the parts.
        train_indices = [i for i in train_indices if readable[i]]
        val_indices = [i for i in val_indices if readable[i]]
        val = (take(everything, val_indices), labels[val_indices])
        epoch_batches = cached_batches(take(everything, train_indices), labels[train_indices], args.batch_size,
                                       args.seed)
        steps_per_epoch, world_size = math.ceil(len(train_indices) / args.batch_size), 1  # each process alone
        train_size = len(train_indices)
    else:
        from ssd.data import eval_transform

        center_crop = eval_transform(args.resize, args.crop, info["mean"], info["std"])
        val_outputs, val_labels, val_readable = extract(
            backbone, Subset(train_dataset, val_indices), center_crop, "tokens", n_blocks, args.batch_size,
            args.num_workers, device, on_bad_image=args.on_bad_image)
        val = drop_unreadable(val_outputs, val_labels, val_readable)
        skipped_val = common.count_left_out(val_readable, "validation part")
        epoch_batches, steps_per_epoch, unreadable = augmented_batches(backbone, train_dataset, train_indices, args,
                                                                       info, n_blocks, device)
    test_outputs, test_labels, test_readable = common.features_for_split(args, backbone, info, args.test_split,
                                                                         "tokens", n_blocks)
    test = drop_unreadable(test_outputs, test_labels, test_readable)
    skipped_test = common.count_left_out(test_readable, args.test_split)
    num_classes = max(len(train_dataset.classes), int(test[1].max()) + 1)
    grid = LinearGrid(settings, take(val[0], [0]), num_classes)
    lr_scale = args.batch_size * world_size / 256  # the grid's lrs are per 256 images, as in DINO / DINOv2
    train_grid(grid, epoch_batches, args.epochs, steps_per_epoch, lr_scale, device)
    if args.mode == "full":  # unreadable images of the training part are only met during training
        skipped_in_training = count_distinct(unreadable)
        train_size = len(train_indices) - skipped_in_training
        skipped_train = skipped_val + skipped_in_training
    report = select_and_test(grid, val, test, device)
    if not common.is_main_process():
        return report
    print(format_table(report))
    report = {"protocol": "linear", "mode": args.mode, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr_scale": lr_scale, "val_fraction": args.val_fraction, "seed": args.seed,
              **common.report_header(args, info, train_size=train_size, val_size=len(val[1]),
                                     test_size=len(test[1]),
                                     skipped_images={"train": skipped_train, "test": skipped_test}), **report}
    if args.output:
        common.write_json(args.output, report)
        print(f"results written to {args.output}")
    return report


def cli() -> int:
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
