"""Semantic fingerprints (reproduce/fingerprint.py): the code hash ignores docstrings, comments, layout
and where a helper lives, but not behaviour; model fingerprints are stable across thread counts and
calls but move with the model's options; files are rewritten only when their content changes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from reproduce import fingerprint as fp

ORIGINAL = {
    "a.py": '"""Module doc."""\nfrom reproduce.b import helper\n\n\ndef loss(x):\n    """Doc."""\n    return helper(x) * 2  # comment\n',
    "b.py": "def helper(x):\n    return x + 1\n",
    "c.py": "def other(x):\n    return x\n",
}


def _digest(tmp_path, files: dict[str, str]) -> str:
    root = tmp_path / str(len(list(tmp_path.iterdir())))
    (root / "reproduce").mkdir(parents=True)
    for name, text in files.items():
        (root / "reproduce" / name).write_text(text)
    return fp.code_digest(root, ["reproduce"])


def test_code_digest_ignores_docstrings_comments_layout_and_moves(tmp_path):
    base = _digest(tmp_path, ORIGINAL)
    cosmetic = {**ORIGINAL,
        "a.py": 'from reproduce.b import helper\n\n# new comment\ndef loss(x):\n    """Another doc."""\n    return (helper(x)\n            * 2)\n',
        "b.py": '"""Helpers."""\ndef helper(x):\n    """Adds one."""\n    return x + 1  # why\n',
    }
    assert _digest(tmp_path, cosmetic) == base
    moved = {  # helper moved from b.py to c.py: the same pool of definitions
        "a.py": ORIGINAL["a.py"].replace("from reproduce.b import", "from reproduce.c import"),
        "b.py": "",
        "c.py": "def other(x):\n    return x\n\n\ndef helper(x):\n    return x + 1\n",
    }
    assert _digest(tmp_path, moved) == base
    assert _digest(tmp_path, {**ORIGINAL, "a.py": ORIGINAL["a.py"].replace("* 2", "* 3")}) != base
    assert _digest(tmp_path, {**ORIGINAL, "b.py": "def helper(x):\n    return x - 1\n"}) != base
    with pytest.raises(FileNotFoundError, match="fingerprinted code path is missing"):
        fp.code_digest(tmp_path, ["nope"])


def test_model_fingerprint_is_stable_across_threads_and_moves_with_the_model(monkeypatch):
    threads = torch.get_num_threads()
    small = fp.ModelConfig("mit_b0", "cls")  # 2 threads on a busy 2-core machine are slow: the smallest model
    try:
        torch.set_num_threads(2)
        two = fp.model_fingerprint(small)
    finally:
        torch.set_num_threads(threads)
    assert fp.model_fingerprint(small) == two  # write_fingerprints builds with one thread
    one = fp.model_fingerprint(fp.ModelConfig("hrvit_b1", "cls", (), (1, 2, 7, 7)))
    assert set(one["outputs"]) == {"init", "train", "eval"} and one["config"]["key"] == "hrvit_b1/cls/full/1-2-7-7"
    # HRViT's attention starts as exactly 0: only the perturbed forward sees its stripe width
    windows = fp.model_fingerprint(fp.ModelConfig("hrvit_b1", "cls", (), (1, 2, 3, 3)))
    assert windows["structure"] == one["structure"] and windows["outputs"]["init"] == one["outputs"]["init"]
    assert windows["outputs"]["eval"] != one["outputs"]["eval"]
    # a small change of the forward (LayerNorm eps 1e-5 -> 1e-4) shows; the seg model adds predict
    seg = fp.model_fingerprint(fp.ModelConfig("mit_b0", "seg"))
    assert set(seg["outputs"]) == {"init", "train", "eval", "predict"}
    layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda x, shape, w=None, b=None, eps=1e-5: layer_norm(x, shape, w, b, eps * 10))
    assert fp.model_fingerprint(fp.ModelConfig("mit_b0", "seg"))["outputs"]["eval"] != seg["outputs"]["eval"]


def _params(**pretrain):
    runs = pretrain or {"mit_b0": {"model": "mit_b0", "ablate": []}}
    return {"pretrain": runs, "cityscapes": {"mit_b0": {"init": "mit_b0"}}, "ade20k": {"mit_b0": {"init": "mit_b0"}}}


def test_files_are_written_once_memoised_and_pruned(tmp_path):
    root = tmp_path / "repo"
    for rel in {*fp.CODE_PATHS, *fp.MODEL_CODE_PATHS, *fp.MEASURE_PATHS}:  # the real code, so the digests are the real ones
        src, dst = Path(__file__).resolve().parents[1] / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst) if src.is_file() else shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "fingerprints"
    counts = fp.write_fingerprints(_params(), root, out)
    assert counts == {"runs": 3, "configs": 2, "built": 2, "changed": 5}  # cityscapes and ade20k share one config
    files = {p: (p.read_text(), p.stat().st_mtime_ns) for p in out.rglob("*.json") if p.name != "memo.json"}
    assert json.loads((out / "ade20k" / "mit_b0.json").read_text()) == json.loads((out / "cityscapes" / "mit_b0.json").read_text())

    assert fp.write_fingerprints(_params(), root, out) == {"runs": 3, "configs": 2, "built": 0, "changed": 0}
    assert {p: (p.read_text(), p.stat().st_mtime_ns) for p in files} == files  # untouched: md5 and mtime stable

    engine = root / "reproduce" / "train" / "engine.py"
    engine.write_text(engine.read_text().replace('"""', '"""Edited. ', 1) + "\n# comment\n")
    assert fp.write_fingerprints(_params(), root, out)["changed"] == 0
    engine.write_text(engine.read_text() + "\nNEW_CONSTANT = 1\n")
    assert fp.write_fingerprints(_params(), root, out)["changed"] == 1  # code.json only

    two = _params(mit_b0={"model": "mit_b0", "ablate": []}, other={"model": "mit_b0", "ablate": []})
    assert fp.write_fingerprints(two, root, out)["built"] == 0  # same configuration, from the memo
    assert (out / "pretrain" / "other.json").is_file()
    fp.write_fingerprints(_params(), root, out)
    assert not (out / "pretrain" / "other.json").exists()  # run removed from params.yaml
