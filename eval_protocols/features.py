"""Frozen-backbone feature extraction, on one process or many, with an optional on-disk cache.

Every protocol reads features through here. The backbone runs in eval mode without gradients (autocast on
GPU). Two kinds of output:

- ``pooled``: the backbone's own output (B, D), the CLS token for a ViT: what k-NN uses;
- ``tokens``: for ViTs, ``cls`` (B, n, D), the normed CLS token of each of the last n blocks, and
  ``patch_mean`` (B, D), the mean of the last block's patch tokens (registers excluded): what the linear
  protocol concatenates. ``pooled`` comes with it.

Under torch.distributed each process extracts an interleaved shard; after every batch the shards are
all-gathered and written at their dataset indices, so every process ends with the features in dataset order.

An unreadable image is either fatal (``on_bad_image="fail"``) or left out of the evaluation (``"skip"``, with a
BadImageWarning naming it): its row is marked in a ``readable`` mask that comes with the features.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist
from PIL import Image
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ssd.data.folders import UNLABELED
from ssd.data.image_io import UnreadableImageError
from ssd.data.seeded import check_bad_image_policy, skip_or_fail
from ssd.engine.distributed import rank_and_world

KINDS = ("pooled", "tokens")


SKIP_HINT = "pass --on-bad-image skip"  # what the protocols' error says; training names its config key instead
STAND_IN_SIZE = (8, 8)  # any size: the transform resizes it, and its features are never used


def has_block_tokens(backbone: torch.nn.Module) -> bool:
    """ViTs whose blocks' tokens the linear protocol reads: timm VisionTransformer and Eva (the DINOv3 RoPE
    models), which share `forward_intermediates`."""
    return isinstance(backbone, (VisionTransformer, Eva))


def block_count(backbone: torch.nn.Module) -> int:
    """How many blocks' class tokens a ViT can give (0 for backbones without block tokens)."""
    return len(backbone.blocks) if has_block_tokens(backbone) else 0


class TransformedDataset(Dataset):
    """An ssd dataset (``load(index) -> (PIL image, label)``) seen through ``transform``, restricted to
    ``indices``; items are ``(image, label, dataset index, readable)``: the index lets shards be put back in
    order, ``readable`` is False for an unreadable image skipped under ``on_bad_image="skip"``."""

    def __init__(self, dataset, transform, indices: list[int], on_bad_image: str = "skip",
                 how_to_skip: str = SKIP_HINT):
        check_bad_image_policy(on_bad_image)
        self.dataset, self.transform, self.indices = dataset, transform, indices
        self.on_bad_image, self.how_to_skip = on_bad_image, how_to_skip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            image, label = self.dataset.load(index)
        except UnreadableImageError as error:
            skip_or_fail(error, self.dataset.describe(index), self.on_bad_image, self.how_to_skip)
            # Left out, not replaced by another image (that would bias a test set): a blank stand-in keeps the
            # batch's shape and its row is dropped later through readable=False.
            return self.transform(Image.new("RGB", STAND_IN_SIZE)), UNLABELED, index, False
        return self.transform(image), int(label), index, True


def backbone_outputs(backbone: torch.nn.Module, images: torch.Tensor, kind: str, n_last_blocks: int = 4) -> dict:
    """Features of one batch: ``{"pooled": (B, D)}``, plus ``cls`` / ``patch_mean`` for kind="tokens"."""
    if kind not in KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {KINDS}")
    if kind == "pooled" or not has_block_tokens(backbone):
        # Non-ViTs have no tokens: their pooled output is what both protocols use (as in DINO's ResNet eval).
        return {"pooled": backbone(images)}
    # One pass gives every block's output; norm=True applies the final LayerNorm to each, as DINO's
    # get_intermediate_layers does, so the last block's CLS equals the pooled output.
    blocks = backbone.forward_intermediates(
        images, indices=n_last_blocks, norm=True, output_fmt="NLC", return_prefix_tokens=True,
        intermediates_only=True,
    )  # n x (patch tokens (B, L, D), prefix tokens (B, 1 + registers, D))
    cls = torch.stack([prefix[:, 0] for _, prefix in blocks], dim=1)  # (B, n, D), oldest block first
    return {"pooled": backbone(images) if backbone.global_pool != "token" else cls[:, -1],
            "cls": cls, "patch_mean": blocks[-1][0].mean(dim=1)}


def _gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """All processes' ``tensor`` (same shape everywhere) concatenated along dim 0, rank by rank."""
    if world_size == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(pieces, tensor.contiguous())
    return torch.cat(pieces)


def autocast_for(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)  # CPU autocast is slower than float32 for these models


@torch.no_grad()
def extract(
    backbone: torch.nn.Module,
    dataset,
    transform,
    kind: str = "pooled",
    n_last_blocks: int = 4,
    batch_size: int = 128,
    num_workers: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_bad_image: str = "skip",
    how_to_skip: str = SKIP_HINT,
    shard: bool = True,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Features of every image of ``dataset`` in dataset order: ``({name: (N, ...) float32}, labels (N,),
    readable (N,) bool)``. Rows of unreadable images (see ``TransformedDataset``) are zeros, labelled -1 and
    not readable; ``drop_unreadable`` removes them. ``shard=False``: this process extracts every image by
    itself, without collectives, for code that runs on one rank of a process group (the end-of-run k-NN)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = rank_and_world() if shard else (0, 1)
    num_images = len(dataset)
    # Each process takes every world_size-th image; the shards are padded with a repeat of the first images
    # so that all processes run the same number of batches (a collective per batch needs that). For the same
    # reason an unreadable image is marked, never removed, until every process has all rows.
    per_process = math.ceil(num_images / world_size)
    shard = [(rank + world_size * i) % num_images for i in range(per_process)]
    loader = DataLoader(TransformedDataset(dataset, transform, shard, on_bad_image, how_to_skip),
                        batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval().to(device)
    storage: dict[str, torch.Tensor] = {}
    labels = torch.full((num_images,), -1, dtype=torch.long)
    readable = torch.zeros((num_images,), dtype=torch.bool)
    show_bar = progress and rank == 0 and sys.stderr.isatty()  # a bar on a terminal, not in a log file
    bar = tqdm(total=num_images, unit="img", desc="features", disable=not show_bar, smoothing=0.1)
    started = time.perf_counter()
    for images, batch_labels, indices, batch_readable in loader:
        with autocast_for(device):
            outputs = backbone_outputs(backbone, images.to(device, non_blocking=True), kind, n_last_blocks)
        # Gathered on the compute device (NCCL needs GPU tensors), stored on CPU: a 1.28M x 1024 bank would
        # not fit next to the model on most GPUs.
        indices = _gather(indices.to(device), world_size).cpu()
        labels[indices] = _gather(batch_labels.to(device), world_size).cpu()
        batch_readable = _gather(batch_readable.to(device), world_size).cpu()
        readable[indices] = batch_readable
        for name, value in outputs.items():
            value = _gather(value.float(), world_size).cpu()
            value[~batch_readable] = 0.0  # the stand-in image's features: not data, kept out of caches
            if name not in storage:
                storage[name] = torch.zeros((num_images, *value.shape[1:]), dtype=torch.float32)
            storage[name][indices] = value
        bar.update(min(len(indices), num_images - bar.n))
    bar.close()
    if rank == 0 and progress:
        elapsed = time.perf_counter() - started
        print(f"extracted {num_images} images in {elapsed:.1f}s ({num_images / max(elapsed, 1e-9):.1f} img/s)")
    backbone.train(was_training)
    return storage, labels, readable


def drop_unreadable(outputs: dict, labels: torch.Tensor, readable: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The rows of readable images only: ``({name: (M, ...)}, labels (M,))``, M = readable.sum()."""
    return {name: value[readable] for name, value in outputs.items()}, labels[readable]


def extract_features(
    backbone: torch.nn.Module,
    dataset,
    transform,
    batch_size: int = 128,
    num_workers: int = 4,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (M, D) and labels (M,) of the M readable images of ``dataset`` in its order (the k-NN
    input); unreadable images are left out with a warning."""
    outputs, labels, readable = extract(backbone, dataset, transform, "pooled", batch_size=batch_size,
                                        num_workers=num_workers, device=device)
    outputs, labels = drop_unreadable(outputs, labels, readable)
    return outputs["pooled"], labels
