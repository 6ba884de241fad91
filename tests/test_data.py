"""Dataset layouts, label mappings, generated data and the joint segmentation transforms, on tiny
fixture trees built here in each real layout."""
from __future__ import annotations

import hashlib
import random
import sys
import types
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reproduce.data import layouts, synthetic
from reproduce.data.datasets import SegmentationDataset, index_segmentation, sample_seed, SeededSamples, ImageClassDataset
from reproduce.data.layouts import DataLayoutError
from reproduce.data.seg_transforms import SegTestTransform, SegTrainTransform, keep_ratio_size, random_crop, to_tensors


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_imagenet(root: Path, classes=("n01440764", "n01443537"), per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for c, wnid in enumerate(classes):
            for i in range(per_class):
                path = root / split / wnid / f"{split}_{c}_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_rgb(40, 48, c * 10 + i)).save(path, quality=95)
    return root


def make_cityscapes(root: Path, label_suffix: str = "_gtFine_labelTrainIds.png", label: np.ndarray | None = None) -> Path:
    label = np.zeros((32, 64), np.uint8) if label is None else label
    for split in ("train", "val"):
        for city, idx in (("aachen", 0), ("bremen", 1)):
            stem = f"{city}_{idx:06d}_000019"
            _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb(*label.shape, idx))
            _png(root / "gtFine" / split / city / f"{stem}{label_suffix}", label)
    return root


def make_ade20k(root: Path, label: np.ndarray) -> Path:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(2):
            path = base / "images" / split / f"ADE_{split[:3]}_{i:08d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rgb(*label.shape, i)).save(path)
            _png(base / "annotations" / split / f"ADE_{split[:3]}_{i:08d}.png", label)
    return root


# ------------------------------------------------------------------ ImageNet layout


def test_imagenet_layout_is_indexed_and_loaded(tmp_path):
    from reproduce.data.pipelines import classification_set as make_dataset
    from reproduce.recipes import profile_recipe, resolve

    root = make_imagenet(tmp_path / "imagenet")
    splits = layouts.index_imagenet(root)
    classes, samples = splits["train"]
    assert classes == ["n01440764", "n01443537"]
    assert [t for _, t in samples] == [0, 0, 1, 1] and len(splits["val"][1]) == 4
    recipe = resolve(profile_recipe("pretrain", "paper"), {"image_size": 32})
    for augment in (True, False):
        image, target = make_dataset(samples, recipe, augment)[3]
        assert image.shape == (3, 32, 32) and target == 1


@pytest.mark.parametrize(
    "damage, problem, offender",
    [
        (lambda r: __import__("shutil").rmtree(r / "val"), "missing ImageNet 'val' folder", "val"),
        (lambda r: [p.unlink() for p in (r / "train" / "n01443537").iterdir()], "class folder without images", "train/n01443537"),
        (lambda r: (r / "train" / "stray.JPEG").write_bytes(b""), "files directly under 'train/'", "train/stray.JPEG"),
        (lambda r: (r / "val" / "n09999999" / "x.JPEG").parent.mkdir() or Image.new("RGB", (4, 4)).save(r / "val" / "n09999999" / "x.JPEG", "JPEG"), "different class folders", "val/n09999999"),
    ],
)
def test_imagenet_layout_errors_name_the_layout_and_first_offender(tmp_path, damage, problem, offender):
    root = make_imagenet(tmp_path / "imagenet")
    damage(root)
    with pytest.raises(DataLayoutError) as err:
        layouts.index_imagenet(root)
    text = str(err.value)
    assert problem in text
    assert f"first offending path: {root / offender}" in text
    assert "<root>/train/<class>/<image>.JPEG" in text  # the expected layout is spelled out


# ------------------------------------------------------------------ Cityscapes layout


def test_cityscapes_train_ids_are_read_unchanged(tmp_path):
    label = np.full((32, 64), 255, np.uint8)
    label[:, :20], label[:, 20:40] = 0, 18
    root = make_cityscapes(tmp_path / "cityscapes", label=label)
    samples = index_segmentation("cityscapes", root, "val")
    assert [s.image.parent.name for s in samples] == ["aachen", "bremen"] and {s.label_kind for s in samples} == {"trainIds"}
    image, target = SegmentationDataset(samples, SegTestTransform((64, 32)))[0]
    assert image.shape == (3, 32, 64) and target.dtype == torch.int64
    assert torch.equal(target, torch.from_numpy(label).long())


def test_cityscapes_image_without_label_fails_naming_the_label_it_expected(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    missing = root / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelTrainIds.png"
    missing.unlink()
    with pytest.raises(DataLayoutError, match="image without a gtFine label") as err:
        index_segmentation("cityscapes", root, "train")
    assert str(missing) in str(err.value) and "leftImg8bit/<split>/<city>" in str(err.value)


def test_cityscapes_missing_split_folder_fails(tmp_path):
    with pytest.raises(DataLayoutError, match="missing gtFine/<split> folder"):
        (tmp_path / "cs" / "leftImg8bit" / "val").mkdir(parents=True)
        index_segmentation("cityscapes", tmp_path / "cs", "val")


# A few rows of cityscapesscripts' official table (helpers/labels.py: name, id, trainId), standing in
# for the package where it is not installed; the loader only reads ``labels[i].id`` / ``.trainId``.
_Label = namedtuple("Label", "name id trainId")
_OFFICIAL_ROWS = [_Label("unlabeled", 0, 255), _Label("road", 7, 0), _Label("sidewalk", 8, 1), _Label("car", 26, 13), _Label("bicycle", 33, 18), _Label("license plate", -1, -1)]


def _label_id_map() -> np.ndarray:
    label = np.zeros((32, 64), np.uint8)
    label[:, 10:20], label[:, 20:30], label[:, 30:40] = 7, 26, 33
    return label


def test_cityscapes_label_ids_are_mapped_with_the_official_table(tmp_path, monkeypatch):
    if "cityscapesscripts" not in sys.modules:
        try:
            import cityscapesscripts.helpers.labels  # noqa: F401
        except ModuleNotFoundError:
            package, helpers, table = (types.ModuleType(n) for n in ("cityscapesscripts", "cityscapesscripts.helpers", "cityscapesscripts.helpers.labels"))
            table.labels = _OFFICIAL_ROWS
            for module in (package, helpers, table):
                monkeypatch.setitem(sys.modules, module.__name__, module)
    root = make_cityscapes(tmp_path / "cityscapes", "_gtFine_labelIds.png", _label_id_map())
    samples = index_segmentation("cityscapes", root, "train")
    assert {s.label_kind for s in samples} == {"labelIds"}
    _, target = SegmentationDataset(samples, SegTestTransform((64, 32)))[0]
    assert target[0, :10].unique().tolist() == [255]  # unlabeled -> ignore
    assert [target[0, c].item() for c in (15, 25, 35)] == [0, 13, 18]  # road, car, bicycle train ids


def test_cityscapes_label_ids_without_cityscapesscripts_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers", None)
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers.labels", None)
    root = make_cityscapes(tmp_path / "cityscapes", "_gtFine_labelIds.png", _label_id_map())
    with pytest.raises(DataLayoutError, match="pip install cityscapesscripts"):
        SegmentationDataset(index_segmentation("cityscapes", root, "train"), SegTestTransform((64, 32)))


# ------------------------------------------------------------------ ADE20K layout


def test_ade20k_reduce_zero_label(tmp_path):
    label = np.zeros((32, 48), np.uint8)
    label[:, 16:32], label[:, 32:] = 1, 150
    root = make_ade20k(tmp_path, label)  # the parent of ADEChallengeData2016 is accepted
    samples = index_segmentation("ade20k", root, "val")
    assert len(samples) == 2 and samples[0].image.parent.name == "validation"
    _, target = SegmentationDataset(samples, SegTestTransform((2048, 512), align=32))[0]
    assert [target[0, c].item() for c in (0, 20, 40)] == [255, 0, 149]


def test_ade20k_missing_annotation_is_named(tmp_path):
    root = make_ade20k(tmp_path, np.zeros((8, 8), np.uint8))
    victim = root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_tra_00000001.png"
    victim.unlink()
    with pytest.raises(DataLayoutError, match="image without an annotation") as err:
        index_segmentation("ade20k", root / "ADEChallengeData2016", "train")
    assert str(victim) in str(err.value)


# ------------------------------------------------------------------ generated data


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generated_data_is_seeded_cached_and_read_by_the_real_loaders(tmp_path):
    seg = synthetic.ensure_synthetic(tmp_path / "a", "seg", seed=3, count=4, size=32)
    cls = synthetic.ensure_synthetic(tmp_path / "a", "cls", seed=3, count=10, size=32)
    assert seg.name == "seg-seed3-n4-32px" and (seg / "COMPLETE").is_file()
    assert _tree_digest(seg) == _tree_digest(synthetic.ensure_synthetic(tmp_path / "b", "seg", seed=3, count=4, size=32))
    assert _tree_digest(seg) != _tree_digest(synthetic.ensure_synthetic(tmp_path / "c", "seg", seed=4, count=4, size=32))
    mtime = (seg / "COMPLETE").stat().st_mtime_ns
    assert synthetic.ensure_synthetic(tmp_path / "a", "seg", seed=3, count=4, size=32) == seg
    assert (seg / "COMPLETE").stat().st_mtime_ns == mtime  # reused, not regenerated
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary left over

    classes, samples = layouts.index_imagenet(cls)["train"]
    assert len(classes) == len(synthetic.CLS_CLASSES) and len(samples) == 10
    train = index_segmentation("synthetic", seg, "train")
    assert len(train) == 4 and all(s.label_kind == "trainIds" for s in train)
    labels = np.stack([np.asarray(Image.open(s.label)) for s in train])
    assert labels.shape == (4, 32, 64)
    assert set(np.unique(labels)) <= set(range(len(synthetic.SEG_CLASSES))) | {255}
    assert (labels[:, -synthetic.SEG_IGNORE_ROWS :] == 255).all()
    pole = synthetic.SEG_CLASSES.index("pole")
    widths = [(row == pole).sum() for img in labels for row in img if (row == pole).any()]
    assert widths and min(widths) <= 2  # thin structures exist


def test_incomplete_generated_folder_is_refused(tmp_path):
    (tmp_path / "seg-seed0-n2-32px").mkdir()
    with pytest.raises(FileExistsError, match="not a complete generated dataset"):
        synthetic.ensure_synthetic(tmp_path, "seg", 0, 2, 32)


# ------------------------------------------------------------------ transforms and seeding


def test_keep_ratio_size_matches_mmseg_resize():
    assert keep_ratio_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert keep_ratio_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert keep_ratio_size(375, 500, (2048, 512)) == (512, 683)  # ADE20K test scale: short side 512


def test_random_crop_avoids_a_crop_dominated_by_one_class():
    label = np.zeros((64, 64), np.uint8)
    label[:, 56:] = 1  # class 1 only in the right 8 columns
    image = np.zeros((64, 64, 3), np.uint8)
    random.seed(0)
    ratios = []
    for _ in range(20):
        _, crop = random_crop(image, label, 16, cat_max_ratio=0.75)
        ratios.append(np.bincount(crop.ravel(), minlength=2).max() / crop.size)
    assert np.mean([r < 0.75 for r in ratios]) > 0.5  # the rule re-draws; plain random crops would mostly be all-0


def test_training_pipeline_pads_and_seeding_reproduces_it():
    image, label = _rgb(24, 28), np.ones((24, 28), np.uint8)
    x, y = to_tensors(image, label, pad_to=32)
    assert x.shape == (3, 32, 32) and (y[24:] == 255).all() and (y[:, 28:] == 255).all() and (y[:24, :28] == 1).all()
    assert (x[:, 24:] == 0).all() and (x[:, :, 28:] == 0).all()

    class Raw(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return SegTrainTransform((80, 40), 32)(_rgb(40, 80), np.arange(3200, dtype=np.uint8).reshape(40, 80) % 7)

    data = SeededSamples(Raw(), seed=5)
    a, b, c = data[(0, 0)], data[(0, 0)], data[(1, 0)]
    assert a[0].shape == (3, 32, 32) and a[1].shape == (32, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])  # another epoch, another draw
    assert sample_seed(5, 0, 0) != sample_seed(5, 1, 0)


def test_image_class_dataset_returns_rgb_tensor(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", per_class=1)
    samples = layouts.index_imagenet(root)["val"][1]
    image, target = ImageClassDataset(samples, lambda img: torch.tensor(np.asarray(img)).permute(2, 0, 1))[1]
    assert image.shape == (3, 40, 48) and target == 1
