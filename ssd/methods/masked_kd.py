"""Masked knowledge distillation: student and fixed teacher both see only the visible patches of a masked image.

After "Masked Autoencoders Enable Efficient Knowledge Distillers" (Bai et al. 2023, DMAE) and MaskedKD (Son et
al. 2023): the teacher runs on the same visible tokens as the student, so with 75% of the patches hidden its
forward costs about a quarter of a full one, and the student's intermediate blocks are pulled toward chosen
teacher blocks through learned projections.

    masks       `RandomKeepCollator`: each image keeps round((1 - distill.mask_ratio) * N) patches, uniformly at
                random, seeded per sample (DMAE hides 75%)
    student     a ViT (model.*, optionally from model.pretrained) on the kept patches only (`encode(keep=...)`)
    teacher     teacher.kind=frozen|random, a ViT with the student's patch size, on the same kept patches
    alignment   distill.block_pairs [[student block, teacher block], ...]: the patch tokens after those blocks
                (-1: the final, normed output), the student's through one projection per pair; with
                distill.targets=pooled|both also the pooled output (class token or token average)
    loss        distill.loss (cosine, or smooth L1 / L2 onto layer-normed teacher tokens), averaged over the pairs

DMAE adds MAE's pixel loss next to the distillation term; here the teacher is the only signal. Evaluation and
export read the student.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ssd.config import ConfigError
from ssd.data.random_keep import RandomKeepCollator
from ssd.losses.feature_loss import feature_distillation_loss
from ssd.methods.fixed_teacher_base import DistilsFixedTeacher
from ssd.models.backbone import build_student_backbone, encoder_network, patch_size_of
from ssd.models.feature_maps import build_projection
from ssd.models.tokens import Tokens, encode, require_tokens
from ssd.teachers import build_teacher, store_origin_instead

FINAL = -1


@contextmanager
def block_outputs(backbone: nn.Module, blocks: list[int]):
    """Collects {block: (B, prefix + K, D)} outputs of the chosen transformer blocks during one forward."""
    collected: dict[int, torch.Tensor] = {}
    handles = [backbone.blocks[block].register_forward_hook(
        lambda _module, _inputs, output, block=block: collected.__setitem__(block, output)) for block in blocks]
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()


def patch_tokens_at(backbone: nn.Module, images: torch.Tensor, keep: torch.Tensor,
                    blocks: list[int]) -> tuple[Tokens, list[torch.Tensor]]:
    """The final tokens of `images` restricted to `keep` (B, K), and the kept patch tokens (B, K, D) after each of
    `blocks` (FINAL: the final, normed ones)."""
    inner = sorted({block for block in blocks if block != FINAL})
    with block_outputs(backbone, inner) as collected:
        tokens = encode(backbone, images, keep=keep)
    prefix = backbone.num_prefix_tokens
    return tokens, [tokens.patches if block == FINAL else collected[block][:, prefix:] for block in blocks]


def _check_pairs(pairs, student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    checked = []
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(f"distill.block_pairs holds [student block, teacher block] pairs; {list(pair)} is not one "
                              "(e.g. distill.block_pairs=[[1,3],[-1,-1]])")
        for side, block, network in (("student", pair[0], student), ("teacher", pair[1], teacher)):
            depth = len(network.blocks)
            if not FINAL <= block < depth:
                raise ConfigError(f"distill.block_pairs names {side} block {block}, but the {side} has {depth} blocks "
                                  f"(0..{depth - 1}, or -1 for its final output)")
        checked.append((int(pair[0]), int(pair[1])))
    return checked


class MaskedKnowledgeDistillation(DistilsFixedTeacher):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.student = encoder_network(build_student_backbone(cfg.model))
        require_tokens(self.student.backbone, cfg.method.name)
        self.teacher, origin = build_teacher(cfg, self.student, encoder_network)
        require_tokens(self.teacher.backbone, f"{cfg.method.name} (its teacher)")
        store_origin_instead(self, origin, "teacher")
        self.patch_size = patch_size_of(self.student.backbone)
        if patch_size_of(self.teacher.backbone) != self.patch_size:
            raise ConfigError(f"the teacher's patches ({patch_size_of(self.teacher.backbone)} px) must match the "
                              f"student's ({self.patch_size} px): both networks see the same kept patches")
        distill = cfg.distill
        self.pairs = _check_pairs(distill.block_pairs, self.student.backbone, self.teacher.backbone)
        self.use_pooled = distill.targets in ("pooled", "both")
        if distill.targets == "pooled":
            self.pairs = []
        elif not self.pairs:
            raise ConfigError(f"distill.targets={distill.targets} aligns patch tokens, but distill.block_pairs is "
                              "empty: give pairs (e.g. [[-1,-1]]) or set distill.targets=pooled")
        student_dim, teacher_dim = self.student.backbone.num_features, self.teacher.backbone.num_features
        self.projections = nn.ModuleList(build_projection(distill.projection, student_dim, teacher_dim)
                                         for _ in self.pairs)
        self.pooled_projection = build_projection(distill.projection, student_dim, teacher_dim) if self.use_pooled else None

    # ---- engine contract (the rest: DistilsFixedTeacher) ---------------------------------------------------
    def make_collate(self, seed: int) -> RandomKeepCollator:
        grid = self.cfg.crops.global_size // self.patch_size
        return RandomKeepCollator(grid * grid, self.cfg.distill.mask_ratio, seed)

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        images, keep = batch["crops"][0], batch["keep"]  # (B, 3, H, W), (B, K)
        kind = self.cfg.distill.loss
        with torch.no_grad():
            teacher_tokens, teacher_blocks = patch_tokens_at(self.teacher.backbone, images, keep,
                                                             [teacher for _, teacher in self.pairs])
        student_tokens, student_blocks = patch_tokens_at(self.student.backbone, images, keep,
                                                         [student for student, _ in self.pairs])
        terms = [feature_distillation_loss(projection(student), teacher, kind)
                 for projection, student, teacher in zip(self.projections, student_blocks, teacher_blocks)]
        outputs = {}
        if self.use_pooled:
            projected = self.pooled_projection(student_tokens.pooled)  # (B, D_t)
            terms.append(feature_distillation_loss(projected, teacher_tokens.pooled, kind))
            outputs["pooled_cosine"] = torch.cosine_similarity(projected.detach().float(),
                                                               teacher_tokens.pooled.float()).mean()
        outputs.update({f"pair{i}_loss": term.detach() for i, term in enumerate(terms[:len(self.pairs)])})
        outputs["kept_share"] = torch.tensor(keep.shape[1] / (images.shape[-1] // self.patch_size) ** 2)
        return torch.stack(terms).mean(), outputs
