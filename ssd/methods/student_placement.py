"""Which processes train which student of a multi-student run (`distill.placement`).

    shared   every process trains every student on its own share of the global batch (plain data parallelism)
    split    the processes form equal contiguous blocks, one per student, in the order of distill.students (as
             DINOv3 gives each student a range of ranks). Every process still runs the teacher on its own share,
             so the teacher sees each image once across the job; the crops, masks and teacher targets are then
             exchanged so that each block trains its student on the whole global batch, the member i of a block
             taking the shares of the processes j with j % (block size) == i.

In both, every process holds every student's weights (DDP keeps them equal and the checkpoint is one file); with
`split` a process computes the forward and backward of its own student only, and its loss is scaled by
world / block size so that DDP's average over all processes gives each student the gradient of its global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssd.config import ConfigError
from ssd.engine.distributed import all_gather_rows, process_group


@dataclass(frozen=True)
class Placement:
    student: str | None  # the student this process trains; None: all of them (shared)
    ranks: tuple[int, ...]  # the processes training that student
    sources: tuple[int, ...]  # the processes whose shares of the batch this process trains on
    world: int

    @property
    def loss_scale(self) -> float:
        return self.world / len(self.ranks)

    @property
    def group(self):
        return process_group(self.ranks)


def plan_placement(kind: str, names: list[str], rank: int, world: int) -> Placement:
    """This process's part; with `split` every process creates every block's process group (all must)."""
    if kind == "shared":
        return Placement(None, tuple(range(world)), (rank,), world)
    if world % len(names):
        raise ConfigError(f"distill.placement=split gives each of the {len(names)} students an equal block of "
                          f"processes, but this run has {world}: use a multiple of {len(names)} processes, or "
                          "distill.placement=shared")
    size = world // len(names)
    blocks = [tuple(range(index * size, (index + 1) * size)) for index in range(len(names))]
    for block in blocks:  # collective: the same calls in the same order on every process
        process_group(block)
    index, member = divmod(rank, size)
    return Placement(names[index], blocks[index], tuple(j for j in range(world) if j % size == member), world)


def describe_placement(kind: str, names: list[str], world: int) -> str:
    if kind == "shared" or world % len(names):
        return f"{', '.join(names)}, each on all {world} process(es)"
    size = world // len(names)
    return ", ".join(f"{name} on processes {index * size}-{(index + 1) * size - 1}" for index, name in enumerate(names))


def _pick(pieces: list[torch.Tensor], sources: tuple[int, ...], dim: int = 0) -> torch.Tensor:
    return torch.cat([pieces[j] for j in sources], dim=dim)


def regroup(crops: list[torch.Tensor], masks: torch.Tensor, targets: dict,
            sources: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """This process's batch for its student: the samples of `sources`, in their order, with their masks and teacher
    targets. `masks` (2, B, N) per global view; targets hold `cls_probs` (2B, K) view-major and `patch_probs`
    (M, K) in the order of the masked positions of the view-major masks. Collective: every process calls it."""
    new_crops = [_pick(all_gather_rows(crop), sources) for crop in crops]
    all_masks = [m.transpose(0, 1) for m in all_gather_rows(masks.transpose(0, 1).contiguous())]  # (2, B_j, N)
    views = masks.shape[0]
    per_image = targets["cls_probs"].unflatten(0, (views, -1)).transpose(0, 1).contiguous()  # (B, 2, K)
    cls = [c.transpose(0, 1) for c in all_gather_rows(per_image)]  # (2, B_j, K) of each process
    patch = all_gather_rows(targets["patch_probs"])
    # A process's masked positions run view by view: split its patch targets at its views' masked counts.
    per_view = [list(p.split([int(m[v].sum()) for v in range(views)])) for p, m in zip(patch, all_masks)]
    new_targets = dict(targets)
    new_targets["cls_probs"] = torch.cat([_pick([c[v] for c in cls], sources) for v in range(views)])
    new_targets["patch_probs"] = torch.cat([_pick([p[v] for p in per_view], sources) for v in range(views)])
    return new_crops, _pick(all_masks, sources, dim=1), new_targets
