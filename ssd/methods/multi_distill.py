"""DINOv3-style distillation: one frozen teacher forward per step shared by several students of different sizes.

After DINOv3 (Siméoni et al. 2025, sec. 5.2, and its multi-distillation meta-architecture): the teacher's targets
are computed once, and every student learns them with DINOv2's losses, each with its own heads, optimizer
settings and moving average.

    teacher     teacher.kind=frozen (or random), a ViT with a class head and a patch head: both come from an ssd
                DINO/iBOT/DINOv2 checkpoint that holds them (else they are seeded by teacher.seed). Once per step:
                its class-token distributions of the global crops and its patch distributions at the masked
                positions, centred with Sinkhorn-Knopp (DINOv3's choice) or the EMA centre
    students    distill.students: [{name: small, ...}, {name: conv, arch: convnext_atto, ...}], each model.* with
                the entry's keys on top, with its own class and patch heads (head.*) onto the teacher's prototypes
    ViT         DINO on the class tokens of all crops (its global crops masked), iBOT on the masked patches, KoLeo
    ConvNeXt    the same three losses: its pooled features stand for the class token, and its last feature map,
                resized to the teacher's patch grid, is scored at the masked positions (the CNN sees the whole
                image: there are no tokens to mask)
    optimizer   parameter groups per student (AdamW's state is per parameter, so this is the same as one
                optimizer each), gradients clipped per student (`clip_sets`), lr x the entry's lr_multiplier
    averages    each student's backbone moving average (method.momentum_teacher -> momentum_teacher_end), what
                evaluation and export read: `python -m ssd.export RUN --which <name>`; the first student is the
                run's default network

    placement   distill.placement=shared: every process trains every student on its share of the batch; split:
                one block of processes per student, each on the whole global batch after the teacher ran once
                per image across all processes (ssd/methods/student_placement.py)

All students see the same crops and masks; the loss is the sum of theirs, and no student's gradient depends on
another's. ViT students need the teacher's patch size (the masks are laid on its grid).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ssd.checkpoint_import import model_config
from ssd.config import ConfigError, student_specs
from ssd.engine.distributed import all_reduce_sum, rank_and_world
from ssd.losses.dino_loss import DINOLoss
from ssd.losses.ibot_patch_loss import IBOTPatchLoss, masked_token_weights
from ssd.methods.ibot import NUM_GLOBAL_VIEWS, MaskedDistillation
from ssd.methods.student_placement import describe_placement, plan_placement, regroup
from ssd.models.backbone import build_student_backbone, patch_size_of
from ssd.models.feature_maps import pooled_and_dense, resize_to
from ssd.models.layer_decay import vit_parameter_groups
from ssd.models.token_network import TokenNetwork
from ssd.models.tokens import encode, has_tokens, require_tokens
from ssd.teachers import build_teacher, ema_update, frozen_copy, store_origin_instead

log = logging.getLogger("ssd")
STUDENT_TERMS = ("loss", "loss_class", "loss_patch", "loss_koleo")  # what each student logs, as "<name>/<term>"


class MultiStudentDistillation(MaskedDistillation):
    """Reuses iBOT/DINOv2's `teacher_targets` (once per step), `losses_from_features` and `make_collate`."""

    eval_network = "student"  # the teacher is fixed; checkpoints name each student (`exported_networks`)

    def __init__(self, cfg):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.specs = student_specs(cfg)
        method = cfg.method
        patch_dim = method.patch_out_dim or cfg.head.out_dim
        if method.shared_head and patch_dim != cfg.head.out_dim:
            raise ConfigError(f"method.shared_head=true scores patches with the class head, so method.patch_out_dim "
                              f"({patch_dim}) must be 0 or head.out_dim ({cfg.head.out_dim})")
        self.students = nn.ModuleDict()
        for spec in self.specs:
            backbone = build_student_backbone(model_config(spec["model"]))
            self.students[spec["name"]] = self._network(backbone, patch_dim)
        first = next(iter(self.students.values()))
        self.teacher, origin = build_teacher(cfg, first, lambda network: self._network(network, patch_dim))
        require_tokens(self.teacher.backbone, f"{method.name} (its teacher)")
        store_origin_instead(self, origin, "teacher")
        self.patch_size = patch_size_of(self.teacher.backbone)
        if cfg.crops.global_size % self.patch_size:
            raise ConfigError(f"crops.global_size={cfg.crops.global_size} is not a multiple of the teacher's patch size "
                              f"{self.patch_size}: the masks are laid on the teacher's patch grid")
        for name, network in self.students.items():
            student_patch = patch_size_of(network.backbone)
            if has_tokens(network.backbone) and student_patch != self.patch_size:
                raise ConfigError(f"student {name} has {student_patch} px patches, the teacher {self.patch_size} px: "
                                  f"a ViT student shares the teacher's masks, so give it patch_size: {self.patch_size}")
        # The averages that evaluation and export read; they start as the students and never get gradients.
        self.averages = nn.ModuleDict({name: frozen_copy(network.backbone) for name, network in self.students.items()})
        rank, world = rank_and_world()
        self.placement = plan_placement(cfg.distill.placement, list(self.students), rank, world)
        log.info("%d students from one teacher forward per step: %s", len(self.students), describe_placement(
            cfg.distill.placement, list(self.students), world))
        self.dino_loss = DINOLoss(cfg.head.out_dim, method.student_temp, method.center_momentum)
        self.patch_loss = IBOTPatchLoss(patch_dim, method.student_temp, method.center_momentum)

    # ---- engine contract -------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.averages.eval()
        return self

    def param_groups(self) -> list[dict]:
        groups = []
        for spec in self.specs:
            network = self.students[spec["name"]]
            for group in vit_parameter_groups(network, network.backbone, self.cfg.optim):
                group["lr_multiplier"] *= spec["lr_multiplier"]
                groups.append(group)
        return groups

    def clip_sets(self) -> list[list[nn.Parameter]]:
        """Gradients are clipped per student: one student's large gradient does not shrink another's step."""
        return [[p for p in network.parameters() if p.requires_grad] for network in self.students.values()]

    def student_networks(self) -> list[nn.Module]:
        return list(self.students.values())

    def last_layer_parameters(self) -> list[nn.Parameter]:
        heads = [head for network in self.students.values() for head in (network.head, network.patch_head) if head]
        return [p for head in heads for p in head.last_layer.parameters()]

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        crops, view_masks = batch["crops"], batch["masks"]  # V tensors (B, 3, H, W), global crops first; (2, B, N)
        global_images, masks, rows, columns, token_weights = self._layout(crops, view_masks)
        targets = self.teacher_targets(global_images, rows, columns, schedule)  # the one teacher forward
        outputs = {"teacher_probs": targets["cls_probs"], "teacher_features": targets["cls_features"],
                   "masked_share": masks.float().mean().detach()}
        placement = self.placement
        if placement.student is not None:  # split: this process trains its student on its block's share
            crops, view_masks, targets = regroup(crops, view_masks, targets, placement.sources)
            global_images, masks, rows, columns, token_weights = self._layout(crops, view_masks)
        total = global_images.new_zeros((), dtype=torch.float32)
        for name, network in self.students.items():
            if placement.student not in (None, name):  # another block's student: no compute, but in DDP's graph
                total = total + 0.0 * sum(p.sum() for p in network.parameters() if p.requires_grad)
                continue
            if has_tokens(network.backbone):
                loss, terms, _ = self.student_losses(network, global_images, crops, masks, rows, columns,
                                                     token_weights, targets, placement.group)
            else:
                loss, terms = self._feature_map_student_losses(network, global_images, crops, rows, columns,
                                                               token_weights, len(masks), targets, placement.group)
            total = total + placement.loss_scale * loss
            outputs[f"{name}/loss"] = loss.detach()
            outputs.update({f"{name}/{term}": value for term, value in terms.items()})
        return total, outputs

    @staticmethod
    def _layout(crops: list[torch.Tensor], view_masks: torch.Tensor):
        """The global crops as one batch (2B, 3, H, W), their masks view-major (2B, N), the M masked positions
        (rows, columns) and each one's weight 1 / (masked patches of its image)."""
        masks = view_masks.flatten(0, 1)
        rows, columns = torch.nonzero(masks, as_tuple=True)
        return torch.cat(crops[:NUM_GLOBAL_VIEWS]), masks, rows, columns, masked_token_weights(masks)

    def _feature_map_student_losses(self, network: TokenNetwork, global_images, crops, rows, columns, token_weights,
                                    num_images: int, targets: dict, group=None) -> tuple[torch.Tensor, dict]:
        """A student without tokens (ConvNeXt, ResNet): pooled features as its class token, its last feature map
        resized to the teacher's patch grid as its patch tokens, on unmasked crops."""
        pooled, dense = pooled_and_dense(network.backbone, global_images)  # (2B, D), (2B, D, h, w)
        grid = (global_images.shape[-2] // self.patch_size, global_images.shape[-1] // self.patch_size)
        patches = resize_to(dense, grid).flatten(2).transpose(1, 2)  # (2B, N, D)
        local_crops = self.local_crops(crops)
        local_pooled = encode(network.backbone, torch.cat(local_crops)).pooled if local_crops else None
        loss, terms = self.losses_from_features(network, pooled, local_pooled, patches[rows, columns], token_weights,
                                                num_images, targets, group)
        return loss + 0.0 * network.mask_token.sum(), terms  # no tokens to mask: kept in the graph for DDP

    def is_logged(self, output_name: str) -> bool:
        return "/" in output_name or output_name == "masked_share"  # "<student>/loss_class", ...

    def monitor(self, outputs: dict) -> dict:
        """With distill.placement=split each process knows its own student's terms: they are averaged over its
        block and shared (collective: the engine calls monitor on every process at the same steps)."""
        stats = super().monitor(outputs)
        if self.placement.student is None:
            return stats
        names = [f"{student}/{term}" for student in self.students for term in STUDENT_TERMS]
        own = [float(outputs.get(name, 0.0)) / len(self.placement.ranks) for name in names]
        return {**stats, **dict(zip(names, all_reduce_sum(torch.tensor(own, dtype=torch.float64)).tolist()))}

    @torch.no_grad()
    def after_step(self, schedule: dict) -> None:
        self.update_centres()
        for name, network in self.students.items():
            ema_update(self.averages[name], network.backbone, schedule["teacher_momentum"])

    def eval_backbone(self) -> nn.Module:
        return next(iter(self.averages.values()))

    def eval_backbones(self) -> dict[str, tuple[nn.Module, dict]]:
        """Every student's average with its model config: what the end-of-run k-NN reports."""
        return {spec["name"]: (self.averages[spec["name"]], spec["model"]) for spec in self.specs}

    def exported_networks(self) -> dict[str, dict]:
        """What a checkpoint records so that export and evaluation find each student: its state-dict prefix and
        model config. The first is what `--which teacher` (the default) means."""
        return {spec["name"]: {"prefix": f"averages.{spec['name']}.", "model": spec["model"]}
                for spec in self.specs}
