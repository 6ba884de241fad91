"""HRViT (registered with timm as hrvit_b1/b2/b3), the shared SegFormer head and the model factory."""
from models.factory import available_models, build_model, register_segmentation_backbone

__all__ = ["available_models", "build_model", "register_segmentation_backbone"]
