"""ssd: self-supervised self-distillation pretraining of image encoders."""

__version__ = "0.1.0"
