from .birefnet import BACKBONES, BiRefNet
from .registry import MODELS, ModelSpec, lookup
from .weights import ModelInfo, WeightsError, load_birefnet

__all__ = ["BACKBONES", "MODELS", "BiRefNet", "ModelInfo", "ModelSpec", "WeightsError", "load_birefnet", "lookup"]
