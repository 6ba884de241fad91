"""The suite's one registration point: importing it registers every suite model with timm.

``models`` holds HRViT and the shared pieces; ``baselines`` (MiT, CSWin, HRNet-ViT) builds on them.
Neither imports the other's registrations, so this is the place that makes both known, and
``models.factory`` imports it on first use.
"""
import baselines  # noqa: F401  (mit_b*, cswin_*, hrnet*_{mit,cswin})
import models  # noqa: F401  (hrvit_b1/b2/b3)
from models.factory import available_models, build_model

__all__ = ["available_models", "build_model"]
