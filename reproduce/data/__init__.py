"""Datasets for pretraining and fine-tuning: the real layouts (ImageNet folders, Cityscapes,
ADE20K), the seeded generated stand-ins written in those same layouts, and the joint
image/label transforms of the SegFormer pipelines.

There is one loader per layout; the generated data goes through it like real data does.
"""
