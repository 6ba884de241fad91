"""Training and evaluation: ``pretrain`` (ImageNet-layout classification), ``finetune``
(segmentation) and ``evaluate``, on one engine that runs from one CPU process to many GPU nodes
(torchrun + DDP)."""
