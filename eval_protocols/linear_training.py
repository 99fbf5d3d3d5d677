"""Training and scoring linear heads on a frozen backbone: where batches come from (precomputed features or
freshly augmented images), the SGD loop, evaluation, and model selection on a held-out validation part."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from eval_protocols.features import TransformedDataset, autocast_for, backbone_outputs
from eval_protocols.linear_heads import LinearGrid, count_correct
from ssd.engine.distributed import is_distributed, rank_and_world

log = logging.getLogger(__name__)
SCHEDULES = ("step", "epoch")


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


def training_augmentation(crop: int, mean, std, interpolation: str) -> v2.Compose:
    """Random-resized crop (scale 0.08-1, torchvision's default) + horizontal flip, as DINO's eval_linear.py
    trains its heads (bilinear there; DINOv2's linear evaluation uses bicubic)."""
    mode = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}[interpolation]
    return v2.Compose([
        v2.RandomResizedCrop(crop, interpolation=mode), v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])


def augmented_batches(backbone, dataset, indices, transform, args, n_last_blocks: int, device: torch.device):
    """Per epoch, freshly augmented images run through the frozen backbone (the full DINO protocol).

    Returns ``(epoch_batches, steps per epoch, unreadable)``: rows of unreadable images are dropped from their
    batch (which may become empty) and their dataset indices collected in the set ``unreadable``."""
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


def cosine(peak: float, progress: float) -> float:
    """Cosine annealing from ``peak`` (progress 0) to 0 (progress 1)."""
    return 0.5 * peak * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_grid(grid: LinearGrid, epoch_batches, epochs: int, steps_per_epoch: int, lr_scale: float,
               device: torch.device, schedule: str = "step") -> None:
    """SGD (momentum 0.9, no weight decay) on the summed losses of all heads, cosine-annealed to 0: at every step
    (``schedule="step"``), or once per epoch as DINO's ``CosineAnnealingLR(epochs)`` does (``"epoch"``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {SCHEDULES}")
    grid.to(device).train()
    distributed = is_distributed()
    model = torch.nn.parallel.DistributedDataParallel(grid) if distributed else grid
    optimizer = torch.optim.SGD(grid.param_groups(lr_scale), momentum=0.9, weight_decay=0.0)
    total_steps, step = max(1, epochs * steps_per_epoch), 0
    for epoch in range(epochs):
        losses = []
        for outputs, labels in epoch_batches(epoch):
            progress = epoch / epochs if schedule == "epoch" else step / total_steps
            for group in optimizer.param_groups:
                group["lr"] = cosine(group["peak_lr"], progress)
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


def setting_rows(grid: LinearGrid, lr_scale: float) -> list[dict]:
    """One JSON row per head: its setting, the lr per 256 images and the lr it actually trained with."""
    return [{**setting.as_dict(), "actual_lr": setting.lr_per_256 * lr_scale} for setting in grid.settings]


def select_and_test(grid: LinearGrid, val: tuple, test: tuple, device: torch.device, lr_scale: float = 1.0) -> dict:
    """Validation accuracy of every head; the best head (first on ties) alone is then run on the test split."""
    val_results = evaluate(grid, *val, device)
    best = max(range(len(val_results)), key=lambda i: (val_results[i]["top1"], -i))
    test_result = evaluate(grid, *test, device, heads=[best])[0]
    rows = [{**row, "val_top1": r["top1"], "val_top5": r["top5"]}
            for row, r in zip(setting_rows(grid, lr_scale), val_results)]
    return {"grid": rows, "best": {**rows[best], "test_top1": test_result["top1"], "test_top5": test_result["top5"]}}


def score_single_head(grid: LinearGrid, test: tuple, device: torch.device, lr_scale: float) -> dict:
    """The one head of a fixed protocol (no selection) on the test split, in ``select_and_test``'s layout."""
    (row,) = setting_rows(grid, lr_scale)
    result = evaluate(grid, *test, device)[0]
    return {"grid": [row], "best": {**row, "test_top1": result["top1"], "test_top5": result["top5"]}}
