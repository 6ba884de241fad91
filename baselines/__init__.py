"""Models HRViT is compared with: MiT, CSWin and the vanilla HRNet-ViT baselines (registered with timm).

Importing the package registers every name with timm and with ``models.factory``.
"""
from baselines import mit  # noqa: F401
from baselines import cswin  # noqa: F401
from baselines import hrnet_vit  # noqa: F401
