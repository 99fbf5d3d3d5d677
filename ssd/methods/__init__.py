"""Training methods. Each one builds its student/teacher/heads and turns a batch into a loss."""

from __future__ import annotations

from ssd.methods.dino import DINO
from ssd.methods.dinov3 import DINOv3
from ssd.methods.feature_distill import FeatureDistillation
from ssd.methods.ibot import MaskedDistillation
from ssd.methods.ijepa import IJEPA
from ssd.methods.mae import MaskedPixels
from ssd.methods.masked_kd import MaskedKnowledgeDistillation
from ssd.methods.multi_distill import MultiStudentDistillation
from ssd.methods.poa import POA
from ssd.methods.posthoc_registers import PostHocRegisters

METHODS = {
    "dino": DINO,
    "ibot": MaskedDistillation,
    "dinov2": MaskedDistillation,
    "dinov3": DINOv3,
    "ijepa": IJEPA,
    "mae": MaskedPixels,
    "feature_distill": FeatureDistillation,
    "masked_kd": MaskedKnowledgeDistillation,
    "posthoc_registers": PostHocRegisters,
    "poa": POA,
    "multi_distill": MultiStudentDistillation,
}


def build_method(cfg):
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method '{cfg.method.name}'; available: {', '.join(METHODS)}")
    return METHODS[cfg.method.name](cfg)


__all__ = [
    "build_method",
    "METHODS",
    "DINO",
    "MaskedDistillation",
    "DINOv3",
    "IJEPA",
    "MaskedPixels",
    "FeatureDistillation",
    "MaskedKnowledgeDistillation",
    "PostHocRegisters",
    "POA",
    "MultiStudentDistillation",
]
