"""Models HRViT is compared with: MiT, CSWin and the vanilla HRNet-ViT baselines (registered with timm)."""
