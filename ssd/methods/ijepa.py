"""I-JEPA (Assran et al. 2023), and SALT's second stage (Li et al. 2025) with `teacher.kind=frozen`.

    context encoder   the student backbone on the kept context patches only (`encode(keep=...)`: no mask tokens
                      enter it), one crop per image
    target encoder    the teacher on the whole crop: the EMA of the student (I-JEPA), or a frozen network (SALT:
                      the pixel-reconstruction teacher of stage 1, any width), features of its last block or of
                      `teacher.feature_block`, layer-normed
    predictor         a narrow ViT: context tokens + a mask token with the position of every target patch ->
                      the teacher's features there; its output layer maps the student's width to the teacher's
    loss              smooth L1 (`method.latent_loss`) over the 4 target blocks of every image

Masks come from `MultiBlockCollator` (ssd/data/multiblock.py): seeded per sample, every block position equally
likely, equal context counts by an unbiased random subset (no truncation). Evaluation and export read the
teacher (EMA) or the student (frozen teacher) with average-pooled patch tokens: the ViT is built without a class
token and with `global_pool=avg` (the recipes' `model.timm_kwargs`), so timm's own pooling is I-JEPA's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssd.config import ConfigError
from ssd.data.multiblock import MultiBlockCollator
from ssd.losses.latent_loss import latent_regression_loss
from ssd.models.backbone import build_student_backbone, encoder_network, patch_size_of
from ssd.models.layer_decay import vit_parameter_groups
from ssd.models.predictor import Predictor, gather_tokens, repeat_for_targets
from ssd.models.tokens import encode, require_tokens
from ssd.teachers import (
    EvaluatesTrainedNetwork,
    build_teacher,
    keep_eval,
    store_origin_instead,
    update_teacher,
)


def require_average_pooling(backbone: nn.Module, method: str) -> None:
    """Evaluation and export use the backbone's own pooling; JEPA-style methods are judged on the mean of the
    encoder's final (layer-normed) patch tokens. timm's default for average pooling moves the final LayerNorm after
    the pooling (fc_norm), which would also leave the tokens the predictor reads unnormalised: it must be off."""
    norm_key = "use_fc_norm" if type(backbone).__name__ == "Eva" else "fc_norm"
    if getattr(backbone, "global_pool", None) != "avg" or isinstance(getattr(backbone, "norm", None), nn.Identity):
        raise ConfigError(f"method.name={method} evaluates the average of the encoder's layer-normed patch tokens, "
                          f"as its paper does: set model.timm_kwargs.global_pool=avg, model.timm_kwargs.{norm_key}="
                          "false and model.timm_kwargs.class_token=false (the I-JEPA ViTs have no class token), or "
                          "start from its recipe (--list-recipes)")


def multiblock_collator(cfg, patch_size: int, seed: int) -> MultiBlockCollator:
    method, grid = cfg.method, cfg.crops.global_size // patch_size
    return MultiBlockCollator(grid, seed=seed, num_targets=method.num_targets,
                              target_scale=tuple(method.target_scale), target_aspect=tuple(method.target_aspect),
                              context_scale=tuple(method.context_scale), min_context=method.min_context)


def build_encoder(cfg) -> nn.Module:
    """The student's ViT (optionally from model.pretrained), checked for tokens and average pooling."""
    backbone = build_student_backbone(cfg.model)
    require_tokens(backbone, cfg.method.name)
    require_average_pooling(backbone, cfg.method.name)
    return backbone


class IJEPA(EvaluatesTrainedNetwork, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.student = encoder_network(build_encoder(cfg))
        self.teacher, origin = build_teacher(cfg, self.student, encoder_network)
        require_tokens(self.teacher.backbone, "ijepa (its teacher)")
        store_origin_instead(self, origin, "teacher")
        self.patch_size = patch_size_of(self.student.backbone)
        teacher_patch = patch_size_of(self.teacher.backbone)
        if teacher_patch != self.patch_size:
            raise ConfigError(f"the teacher's patches ({teacher_patch} px) must match the student's "
                              f"({self.patch_size} px): latent targets are predicted patch by patch")
        grid = cfg.crops.global_size // self.patch_size
        method = cfg.method
        # The output layer is the learned projection from the student's width to the teacher's.
        self.predictor = Predictor(self.student.backbone.num_features, (grid, grid), method.predictor_dim,
                                   method.predictor_depth, method.predictor_heads,
                                   out_dim=self.teacher.backbone.num_features)

    # ---- engine contract -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> IJEPA:
        super().train(mode)
        keep_eval(self.teacher)
        return self

    def make_collate(self, seed: int) -> MultiBlockCollator:
        return multiblock_collator(self.cfg, self.patch_size, seed)

    def param_groups(self) -> list[dict]:
        return vit_parameter_groups(self, self.student.backbone, self.cfg.optim)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return []  # no prototype layer to hold still at the start

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        images = batch["crops"][0]  # (B, 3, H, W)
        context, targets = batch["context"], batch["targets"]  # (B, K), (B, T, M)
        num_targets = targets.shape[1]
        target_index = targets.flatten(0, 1)  # (B * T, M), image-major
        with torch.no_grad():
            features = self.teacher_features(images)  # (B, N, D_teacher), layer-normed
            wanted = gather_tokens(repeat_for_targets(features, num_targets), target_index)  # (B * T, M, D_t)
        context_tokens = encode(self.student.backbone, images, keep=context).patches  # (B, K, D)
        predicted = self.predictor(repeat_for_targets(context_tokens, num_targets),
                                   repeat_for_targets(context, num_targets), target_index)  # (B * T, M, D_t)
        loss = latent_regression_loss(predicted, wanted, kind=self.cfg.method.latent_loss, normalize_targets=False)
        outputs = {"target_std": wanted.float().std(dim=0).mean().detach(),
                   "prediction_std": predicted.detach().float().std(dim=0).mean(),
                   "context_share": torch.tensor(context.shape[1] / features.shape[1])}
        return loss, outputs

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch features of the target encoder, layer-normed over D (I-JEPA normalises its targets)."""
        backbone, block = self.teacher.backbone, self.cfg.teacher.feature_block
        if block < 0:
            patches = encode(backbone, images).patches
        else:
            depth = len(backbone.blocks)
            if block >= depth:
                raise ConfigError(f"teacher.feature_block={block}, but the teacher has {depth} blocks (0..{depth - 1})")
            patches = backbone.forward_intermediates(images, indices=[block], norm=False, output_fmt="NLC",
                                                     intermediates_only=True)[0]
        return F.layer_norm(patches, patches.shape[-1:])

    def monitor(self, outputs: dict) -> dict:
        # A target std near 0 means the target encoder collapsed to a constant (what the EMA and the predictor's
        # bottleneck are there to prevent).
        return {name: float(value) for name, value in outputs.items()}

    @torch.no_grad()
    def after_step(self, schedule: dict) -> None:
        update_teacher(self.cfg.teacher.kind, self.teacher, self.student, schedule["teacher_momentum"])
