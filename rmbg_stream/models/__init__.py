from .birefnet import BACKBONES, BiRefNet

__all__ = ["BACKBONES", "BiRefNet"]
