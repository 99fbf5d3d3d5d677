"""Feature distillation on unlabeled images: a fixed teacher's features, learned by a student of any architecture.

The setting of "Beyond Self-Supervision" (Cui et al. 2022) and of SSLD-style distillation of off-the-shelf models:
take a large self-supervised model, make a smaller or different backbone (ViT, ConvNeXt, ResNet) reproduce its
features on unlabeled images.

    teacher     teacher.kind=frozen (an ssd run or export, an official DINO/iBOT/DINOv2/DINOv3 checkpoint, a timm
                weights file) or random; runs once per crop batch under no_grad, in eval mode
    student     model.* (optionally from model.pretrained), any timm backbone
    targets     distill.targets: the pooled embedding (class token / average / global pool), the dense features
                (ViT patch tokens or a CNN's last feature map, the student's resized to the teacher's grid), or both
    projection  distill.projection: linear or MLP from the student's width to the teacher's, one for the pooled
                and one for the dense features
    loss        distill.loss: cosine, or smooth L1 / L2 onto layer-normed teacher features; the dense term weighs
                distill.patch_weight
    views       every crop of crops.* (global and local: the usual augmentations) is seen by both networks

Evaluation and export read the student.
"""

from __future__ import annotations

import torch

from ssd.config import ConfigError
from ssd.data.seeded import collate_crops
from ssd.losses.feature_loss import feature_distillation_loss
from ssd.methods.fixed_teacher_base import DistilsFixedTeacher
from ssd.models.backbone import build_student_backbone, encoder_network
from ssd.models.feature_maps import build_projection, pooled_and_dense, resize_to
from ssd.models.multicrop import same_size_groups
from ssd.teachers import build_teacher, store_origin_instead


class FeatureDistillation(DistilsFixedTeacher):
    """pooled_cosine in the monitors near 1: the student reproduces the teacher's embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.student = encoder_network(build_student_backbone(cfg.model))
        self.teacher, origin = build_teacher(cfg, self.student, encoder_network)
        store_origin_instead(self, origin, "teacher")
        distill = cfg.distill
        self.use_pooled = distill.targets in ("pooled", "both")
        self.use_dense = distill.targets in ("patches", "both")
        student_dim, teacher_dim = self.student.backbone.num_features, self.teacher.backbone.num_features
        self.pooled_projection = build_projection(distill.projection, student_dim, teacher_dim) if self.use_pooled else None
        self.dense_projection = build_projection(distill.projection, student_dim, teacher_dim) if self.use_dense else None
        if self.use_dense:
            self._check_dense(cfg)

    def _check_dense(self, cfg) -> None:
        probe = torch.zeros(1, 3, cfg.crops.global_size, cfg.crops.global_size)
        for name, network in (("student", self.student), ("teacher", self.teacher)):
            was_training = network.training
            try:
                with torch.no_grad():
                    network.eval()
                    pooled_and_dense(network.backbone, probe)
            except ValueError as error:
                raise ConfigError(f"distill.targets={cfg.distill.targets} matches dense features, but the {name}'s "
                                  f"are unusable: {error}") from None
            finally:
                network.train(was_training)

    # ---- engine contract (the rest: DistilsFixedTeacher) ---------------------------------------------------
    def make_collate(self, seed: int):
        return collate_crops

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        crops = batch["crops"]
        total, pooled_cosines, teacher_stds = 0.0, [], []
        for images in same_size_groups(crops):  # (V_s * B, 3, H, W)
            with torch.no_grad():
                teacher_pooled, teacher_dense = pooled_and_dense(self.teacher.backbone, images)
            student_pooled, student_dense = pooled_and_dense(self.student.backbone, images)
            loss = images.new_zeros(())
            if self.use_pooled:
                projected = self.pooled_projection(student_pooled)  # (N, D_t)
                loss = loss + feature_distillation_loss(projected, teacher_pooled, self.cfg.distill.loss)
                pooled_cosines.append(torch.cosine_similarity(projected.detach().float(), teacher_pooled.float()).mean())
            if self.use_dense:
                dense = resize_to(student_dense, tuple(teacher_dense.shape[-2:])).flatten(2).transpose(1, 2)
                projected = self.dense_projection(dense)  # (N, h * w, D_t)
                wanted = teacher_dense.flatten(2).transpose(1, 2)  # (N, h * w, D_t)
                loss = loss + self.cfg.distill.patch_weight * feature_distillation_loss(projected, wanted,
                                                                                       self.cfg.distill.loss)
            # Every crop counts alike: a size group's loss weighs by how many crops it holds.
            total = total + loss * (len(images) / len(crops[0]))
            teacher_stds.append(teacher_pooled.float().std(dim=0).mean())
        outputs = {"teacher_std": torch.stack(teacher_stds).mean()}
        if pooled_cosines:
            outputs["pooled_cosine"] = torch.stack(pooled_cosines).mean()
        return total / len(crops), outputs
