from ssd.losses.dino_loss import DINOLoss, dino_cross_entropy

__all__ = ["DINOLoss", "dino_cross_entropy"]
