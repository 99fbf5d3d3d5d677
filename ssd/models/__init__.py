from ssd.models.backbone import build_backbone, is_vit, timm_kwargs
from ssd.models.dino_head import DINOHead
from ssd.models.multicrop import MultiCropEncoder

__all__ = ["build_backbone", "is_vit", "timm_kwargs", "DINOHead", "MultiCropEncoder"]
