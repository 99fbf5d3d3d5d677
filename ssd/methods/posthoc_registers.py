"""Post-hoc registers, PH-Reg (Chen et al. 2025, "Vision Transformers with Self-Distilled Registers").

A ViT trained without registers shows artifact tokens: patch tokens of abnormal norm that carry global
information instead of their patch's (Darcet et al. 2024). PH-Reg adds registers after the fact, by distilling
the ViT into itself:

    student   the pretrained ViT (model.pretrained) plus `model.num_registers` new register tokens, freshly
              initialised; only the parameters named by `distill.trainable` (fnmatch patterns on the backbone's
              parameter names) train. The paper's choice, the recipe default: the registers, the position
              embedding, the patch embedding and the last block (its released DINOv2 training script)
    teacher   the same ViT without registers, frozen (teacher.kind=frozen teacher.source=<the same weights>)
    targets   the teacher's patch tokens denoised by test-time augmentation (ssd/models/tta_targets.py):
              `distill.tta_views` views per image (view 0 the image; the others shifted by up to
              `distill.tta_max_shift` pixels, 0 for half a patch, and flipped with `crops.flip_probability`:
              features are flip-equivariant only where the ViT learnt so, and a ViT trained without flips, as
              the digits recipes are, sees a flipped digit as another shape), realigned, averaged
    loss      on the student's patch tokens (`distill.loss`; PH-Reg's own: cosine_l2 = 1 - cos + MSE)

The views' shifts and flips are drawn in the collate function from (train.seed, epoch, sample index), like the
masks of the masked methods, so a resumed run sees the same views. Evaluation and export read the student,
registers included (timm's `reg_tokens`).
"""

from __future__ import annotations

import copy
import logging
from fnmatch import fnmatch

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ssd.checkpoint_import import (
    WeightsError,
    convert_official_vit,
    is_native,
    load_state_strict,
    read_weights,
    select_backbone_state,
)
from ssd.config import ConfigError
from ssd.data.seeded import collate_crops, mix_seeds
from ssd.losses.feature_loss import feature_distillation_loss
from ssd.methods.fixed_teacher_base import DistilsFixedTeacher
from ssd.models.backbone import build_backbone, encoder_network, patch_size_of
from ssd.models.tokens import encode, require_tokens
from ssd.models.tta_targets import augment, average_views, draw_views
from ssd.teachers import build_teacher, store_origin_instead

log = logging.getLogger("ssd")
NAME = "posthoc_registers"
_VIEWS_SEED_TAG = 0x74746176  # "ttav": no other per-sample seed of the run coincides with the views'


class TTAViewsCollator:
    """`collate_crops` plus "tta_shifts" (B, V, 2) long pixels (dy, dx) and "tta_flips" (B, V) bool, drawn from
    (seed, epoch, sample index) alone: no DataLoader worker state, so a resumed run sees the same views."""

    def __init__(self, num_views: int, max_shift: int, flip_probability: float, seed: int):
        self.num_views, self.max_shift, self.flip_probability, self.seed = num_views, max_shift, flip_probability, seed

    def __call__(self, samples: list[dict]) -> dict:
        views = [draw_views(np.random.default_rng(mix_seeds(_VIEWS_SEED_TAG, self.seed, int(sample.get("epoch", 0)),
                                                            int(sample["index"]))),
                            self.num_views, self.max_shift, self.flip_probability)
                 for sample in samples]
        return {**collate_crops(samples),
                "tta_shifts": torch.from_numpy(np.stack([shifts for shifts, _ in views])),  # (B, V, 2)
                "tta_flips": torch.from_numpy(np.stack([flips for _, flips in views]))}  # (B, V)


def load_without_registers(backbone: nn.Module, source: str) -> None:
    """The weights of `source` (a ViT without registers) into `backbone`, which has registers: everything must
    fit except the new `reg_token`, which keeps its fresh initialisation. Where the position embedding also
    covers prefix tokens (timm's default, no_embed_class=False), the registers get zero rows in it: "no
    position", as DINOv2 gives its registers."""
    try:
        path, content = read_weights(source)
        state = select_backbone_state(content, "teacher")  # the run's trained network (its student here)
    except WeightsError as error:
        raise ConfigError(f"model.pretrained={source}: {error}") from None
    if "reg_token" in state:
        raise ConfigError(f"model.pretrained={source} already has {state['reg_token'].shape[1]} registers; "
                          f"method.name={NAME} adds registers to a ViT trained without them: start from such a ViT")
    if is_native(content):
        state = _with_register_positions(state, backbone)
    elif isinstance(backbone, VisionTransformer):  # official DINO / DINOv2: its converter gives registers zero rows
        state = convert_official_vit(state, backbone)
    state["reg_token"] = backbone.reg_token.detach().clone()
    try:
        load_state_strict(backbone, state, f"model.pretrained={source} ({path})")
    except WeightsError as error:
        raise ConfigError(f"{error}\n  (method.name={NAME}: only reg_token may be missing; model.* other than "
                          "num_registers must describe the pretrained ViT)") from None


def _with_register_positions(state: dict, backbone: nn.Module) -> dict:
    position = state.get("pos_embed")
    wanted = getattr(backbone, "pos_embed", None)
    registers = backbone.reg_token.shape[1]
    if position is None or wanted is None or wanted.shape[1] != position.shape[1] + registers:
        return state  # no position embedding, or one over patches only: nothing to insert
    cls = 1 if getattr(backbone, "cls_token", None) is not None else 0  # timm's prefix order: class, registers
    zeros = position.new_zeros(1, registers, position.shape[-1])
    return {**state, "pos_embed": torch.cat([position[:, :cls], zeros, position[:, cls:]], dim=1)}


def select_trainable(backbone: nn.Module, patterns: list[str], arch: str) -> list[str]:
    """requires_grad on the parameters whose names match one of `patterns` (fnmatch), off on the others."""
    names = [name for name, _ in backbone.named_parameters()]
    depth = len(getattr(backbone, "blocks", ()))
    available = ", ".join([n for n in names if not n.startswith("blocks.")][:8] + [f"blocks.0-{depth - 1}.*"])
    example = f"distill.trainable=[reg_token,pos_embed,patch_embed.*,blocks.{depth - 1}.*]"
    if not patterns:
        raise ConfigError(f"method.name={NAME} trains only the parameters named by distill.trainable, which is "
                          f"empty: PH-Reg's choice is {example} (['*'] trains all). {arch} has: {available}")
    unmatched = [pattern for pattern in patterns if not any(fnmatch(name, pattern) for name in names)]
    if unmatched:
        raise ConfigError(f"distill.trainable: {', '.join(map(repr, unmatched))} match(es) no parameter of the "
                          f"student ({arch}), whose names are: {available}; e.g. {example}")
    chosen = [name for name in names if any(fnmatch(name, pattern) for pattern in patterns)]
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(name in chosen)
    if "reg_token" not in chosen:
        log.warning("distill.trainable leaves the new registers (reg_token) at their random initialisation")
    return chosen


class PostHocRegisters(DistilsFixedTeacher):
    """Evaluation and export read the student (teacher.kind=frozen): the ViT with its new registers."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        model, distill = cfg.model, cfg.distill
        if model.num_registers < 1 or not model.pretrained:
            raise ConfigError(f"method.name={NAME} adds registers to a pretrained ViT: set model.num_registers=R "
                              "(>= 1; the paper uses 16), model.pretrained=<the ViT's run, checkpoint or weights> and "
                              "teacher.source=<the same>")
        if cfg.teacher.kind != "frozen":
            raise ConfigError(f"method.name={NAME}'s teacher is the pretrained ViT itself: set teacher.kind=frozen "
                              "teacher.source=<the file of model.pretrained>")
        backbone = build_backbone(model)
        require_tokens(backbone, NAME)
        load_without_registers(backbone, model.pretrained)
        self.trainable = select_trainable(backbone, list(distill.trainable), model.arch)
        self.student = encoder_network(backbone)
        # The teacher keeps the architecture of its own file (an ssd run records it); a file that records none
        # is built from model.*, without the student's new registers.
        teacher_cfg = copy.deepcopy(cfg)
        teacher_cfg.model.num_registers = 0
        self.teacher, origin = build_teacher(teacher_cfg, self.student, encoder_network)
        store_origin_instead(self, origin, "teacher")
        self._check_teacher_fits()
        self.patch_size = patch_size_of(backbone)
        self.max_shift = distill.tta_max_shift or self.patch_size // 2
        if self.max_shift >= cfg.crops.global_size:
            raise ConfigError(f"distill.tta_max_shift={distill.tta_max_shift} pixels would shift whole crops "
                              f"({cfg.crops.global_size} px) out of view: keep it to a few pixels (0: half a patch)")

    def _check_teacher_fits(self) -> None:
        student, teacher = self.student.backbone, self.teacher.backbone
        require_tokens(teacher, f"{NAME} (its teacher)")
        if (patch_size_of(teacher), teacher.num_features) != (patch_size_of(student), student.num_features):
            raise ConfigError(f"the teacher ({patch_size_of(teacher)} px patches, width {teacher.num_features}) must "
                              f"be the student's ViT ({patch_size_of(student)} px, width {student.num_features}): "
                              "PH-Reg distils a ViT into itself; point teacher.source at model.pretrained")

    # ---- engine contract (the rest: DistilsFixedTeacher) ---------------------------------------------------
    def make_collate(self, seed: int) -> TTAViewsCollator:
        return TTAViewsCollator(self.cfg.distill.tta_views, self.max_shift, self.cfg.crops.flip_probability, seed)

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        images, shifts, flips = batch["crops"][0], batch["tta_shifts"], batch["tta_flips"]  # (B, 3, H, W), (B, V, .)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        with torch.no_grad():
            views = encode(self.teacher.backbone, augment(images, shifts, flips)).patches  # (B * V, N, D)
            targets = average_views(views, shifts, flips, self.patch_size, grid)  # (B, N, D)
            unaugmented = views.unflatten(0, flips.shape)[:, 0].float()  # (B, N, D), view 0
        patches = encode(self.student.backbone, images).patches  # (B, N, D)
        # Targets at their own scale: the student keeps the teacher's feature space.
        loss = feature_distillation_loss(patches, targets, self.cfg.distill.loss, normalize_targets=False)
        # The student's fit, and how far denoising moved the targets from the teacher's own tokens.
        return loss, {"cosine_to_targets": F.cosine_similarity(patches.detach().float(), targets, dim=-1).mean(),
                      "teacher_cosine_to_targets": F.cosine_similarity(unaugmented, targets, dim=-1).mean()}
