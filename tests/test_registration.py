"""Registration: what each import makes known to timm, in fresh interpreters (so that no module the
test session imported earlier can hide a missing import), the per-variant metadata living in timm's
pretrained_cfg, and HRNet-ViT built without touching timm's or smp's internals."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_import_models_registers_hrvit_and_not_the_baselines():
    proc = _fresh(
        "import sys, timm, models\n"
        "m = timm.create_model('hrvit_b1')\n"
        "assert sum(p.numel() for p in m.parameters()) == 19_685_152\n"
        "assert 'baselines' not in sys.modules, 'models imported the baselines'\n"
        "assert not timm.is_model('mit_b0')\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_the_registration_point_and_the_factory_know_every_family():
    proc = _fresh(
        "import timm, hrvit_repro\n"
        "for name in ('hrvit_b1', 'mit_b0', 'cswin_ti', 'hrnet18_mit'):\n"
        "    assert timm.is_model(name), name\n"
        "from models import build_model\n"  # the factory alone, as the training commands use it
    )
    assert proc.returncode == 0, proc.stderr
    proc = _fresh("import models\nprint(len(models.available_models()))\nmodels.build_model('mit_b0', task='seg')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["17"]


def test_per_variant_metadata_lives_in_the_pretrained_cfg():
    import hrvit_repro  # noqa: F401

    from models.factory import available_models, flop_family, segmentation_embed_dim

    for name in available_models():
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.seg_embed_dim, cfg.flop_family) == (segmentation_embed_dim(name), flop_family(name))
    model = timm.create_model("mit_b1", features_only=True)
    assert (model.pretrained_cfg["seg_embed_dim"], model.pretrained_cfg["flop_family"]) == (256, "mit")


def test_hrnet_vit_builds_without_editing_library_internals(monkeypatch):
    """timm's block-type table is read-only and smp's Attention keeps its learned reduction while an
    HRNet-MiT is built; the pooled reduction is this suite's own module."""
    import torch
    from segmentation_models_pytorch.encoders import mix_transformer as smp_mit
    from timm.models import hrnet

    from baselines.hrnet_vit import PooledSRAttention

    monkeypatch.setattr(hrnet, "block_types_dict", MappingProxyType(dict(hrnet.block_types_dict)))
    with torch.device("meta"):
        model = timm.create_model("hrnet18_mit")
    attentions = [m for m in model.modules() if isinstance(m, smp_mit.Attention)]
    assert attentions and all(isinstance(a, PooledSRAttention) == (a.sr_ratio > 1) for a in attentions)
    assert isinstance(smp_mit.Attention(64, 1, sr_ratio=2).sr, torch.nn.Conv2d)  # smp's class is untouched


@pytest.mark.parametrize("name", ["hrnet18_mit", "hrnet18_cswin"])
def test_hrnet_vit_keeps_its_parameter_count(name):
    """Measured before the construction rewrite (timm block_types_dict + patched attn.sr): unchanged."""
    import torch

    from models.factory import build_model

    with torch.device("meta"):
        model = build_model(name, task="seg")
    assert sum(p.numel() for p in model.parameters()) == {"hrnet18_mit": 8_507_823, "hrnet18_cswin": 8_336_175}[name]
