"""POA, Pre-training Once for models of All sizes (Zhang et al. ECCV 2024): DINO with a third branch, the elastic
student, so that one run trains every sub-network size of the ViT at once.

Each step a sub-network of the intact student (a width and a depth from `elastic.widths` x `elastic.depths`,
never the intact size itself) runs on the same crops with slices of the intact student's own weights
(`ssd.models.elastic_vit`), and learns from the EMA teacher and from the intact student (`ssd.losses.elastic_loss`).
As in POA the projection head is shared: a sub-network of width W feeds the first W inputs of the head's first
layer, scaled by D / W like every linear layer whose input is cut. Evaluation and export read the EMA teacher;
`python -m ssd.extract_subnet` cuts any offered size out of it as a standalone timm model.

The size is drawn from a generator seeded by (train.seed, step): a resumed run draws the same sizes, every
process draws the same one (its gradients are averaged with the others'), and the micro-batches of one step
(gradient accumulation) share it, as POA draws one per iteration. Every parameter also gets a gradient from the
intact student, so DDP needs no unused-parameter search.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from ssd.config import ConfigError
from ssd.data.seeded import mix_seeds
from ssd.losses.elastic_loss import poa_loss
from ssd.methods.dino import DINO, NUM_GLOBAL_VIEWS
from ssd.models.backbone import timm_kwargs
from ssd.models.dino_head import DINOHead
from ssd.models.elastic_vit import ElasticViT
from ssd.models.multicrop import same_size_groups

# POA samples small sub-networks more often: weights fall linearly from 3 (smallest) to 1 (largest) over the
# widths and over the depths, multiplied (`net_select_scale` of its ViT recipes).
SMALL_SIZE_PREFERENCE = 3.0
SIZE_STREAM = 0x90A  # keeps the size draws apart from other (seed, step)-seeded draws


def offered_sizes(elastic_cfg, elastic: ElasticViT) -> tuple[list[int], list[int]]:
    """The widths and depths `elastic.*` offers for `elastic`'s intact network (defaults filled in), checked."""
    full_width, full_depth, head = elastic.full_width, elastic.full_depth, elastic.head_dim
    widths = sorted({int(w) for w in elastic_cfg.widths}) or [
        w for w in range(math.ceil(full_width / 2 / head) * head, full_width + 1, head) if not elastic.width_problem(w)]
    depths = sorted({int(d) for d in elastic_cfg.depths}) or list(range(math.ceil(full_depth / 2), full_depth + 1))
    for width in widths:
        if problem := elastic.width_problem(width):
            raise ConfigError(f"elastic.widths={list(elastic_cfg.widths)}: {width} cannot be used: {problem}. Offer "
                              f"widths like {[w for w in (full_width // 2, full_width) if not elastic.width_problem(w)]}")
    for depth in depths:
        if problem := elastic.depth_problem(depth):
            raise ConfigError(f"elastic.depths={list(elastic_cfg.depths)}: {depth} cannot be used: {problem}")
    return widths, depths


def head_on_narrower_features(head: DINOHead, features: torch.Tensor) -> torch.Tensor:
    """The shared head on a sub-network's features (N, W): its first layer reads the first W of its D inputs,
    scaled by D / W (POA's dynamic head); at W = D, the head itself."""
    first = head.mlp[0]
    width = features.shape[-1]
    if width == first.in_features:
        return head(features)
    weight = first.weight[:, :width] * (first.in_features / width)
    return torch.func.functional_call(head, {"mlp.0.weight": weight}, (features,))


class POA(DINO):
    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            self.elastic = ElasticViT(self.student.backbone, cfg.model.arch, timm_kwargs(cfg.model))
        except ValueError as error:
            raise ConfigError(f"method.name=poa with model.arch={cfg.model.arch}: {error}") from None
        elastic = cfg.elastic
        if not 0.0 <= elastic.weight <= 1.0:
            raise ConfigError(f"elastic.weight={elastic.weight} is the elastic student's share of the loss: set it in "
                              "[0, 1] (POA: 0.2)")
        if elastic.from_intact_weight < 0:
            raise ConfigError(f"elastic.from_intact_weight={elastic.from_intact_weight} must be >= 0 (POA: 1)")
        widths, depths = offered_sizes(elastic, self.elastic)
        intact = (self.elastic.full_width, self.elastic.full_depth)
        self.sizes = [(w, d) for w in widths for d in depths if (w, d) != intact]  # ascending width, then depth
        if not self.sizes:
            raise ConfigError(f"elastic.widths={widths} and elastic.depths={depths} offer no sub-network smaller than "
                              f"the intact student (width {intact[0]}, depth {intact[1]}): add a smaller width or depth")
        width_weights = dict(zip(widths, np.linspace(SMALL_SIZE_PREFERENCE, 1.0, len(widths))))
        depth_weights = dict(zip(depths, np.linspace(SMALL_SIZE_PREFERENCE, 1.0, len(depths))))
        self.size_weights = [float(width_weights[w] * depth_weights[d]) for w, d in self.sizes]

    def sample_size(self, step: int) -> tuple[int, int]:
        """(width, depth) of step `step`'s elastic student: a function of (train.seed, step) only."""
        draw = random.Random(mix_seeds(self.cfg.train.seed, step, SIZE_STREAM))
        return draw.choices(self.sizes, weights=self.size_weights)[0]

    def elastic_logits(self, crops: list[torch.Tensor], width: int, depth: int) -> torch.Tensor:
        """Head outputs (V * B, K) of the (width, depth) sub-network, crops of one resolution in one pass."""
        features = torch.cat([self.elastic(group, width, depth) for group in same_size_groups(crops)])
        return head_on_narrower_features(self.student.head, features)

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        crops = batch["crops"]  # V tensors (B, 3, H, W): 2 global crops first, then the local crops
        with torch.no_grad():
            teacher_features, teacher_logits = self.teacher(crops[:NUM_GLOBAL_VIEWS])
        _, intact_logits = self.student(crops)
        width, depth = self.sample_size(schedule["step"])
        elastic_logits = self.elastic_logits(crops, width, depth)
        # Centred by the DINO loss module's centre, which collects the logits for its update after the step; the
        # cross-entropies (the intact student's included) are poa_loss's.
        teacher_probs = self.loss.teacher_probs(teacher_logits, schedule["teacher_temp"])
        self.loss.collect(teacher_logits)
        terms = poa_loss(intact_logits, elastic_logits, teacher_probs, len(crops), NUM_GLOBAL_VIEWS,
                         self.cfg.method.student_temp, self.cfg.elastic.weight, self.cfg.elastic.from_intact_weight)
        outputs = {name: value.detach() for name, value in terms.items() if name != "loss"}
        outputs.update(teacher_probs=teacher_probs.detach(), teacher_features=teacher_features.detach(),
                       elastic_width=width, elastic_depth=depth)
        return terms["loss"], outputs

    def monitor(self, outputs: dict) -> dict:
        stats = super().monitor(outputs)
        stats.update({name: float(value) for name, value in outputs.items() if name.startswith(("loss_", "elastic_"))})
        return stats
