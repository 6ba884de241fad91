"""HRViT (registered with timm as hrvit_b1/b2/b3), the shared SegFormer head and the model factory.

Importing ``models`` registers HRViT with timm. The baselines register themselves in ``baselines``;
``hrvit_repro`` imports both (the factory does so on first use).
"""
from models import hrvit  # noqa: F401  (registers hrvit_b1/b2/b3 with timm)
from models.factory import available_models, build_model

__all__ = ["available_models", "build_model"]
