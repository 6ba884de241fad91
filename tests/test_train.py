"""Training engine: mIoU rules against a hand-computed case, sliding-window inference, up-front
rejection of bad settings, the pretrain -> finetune -> evaluate chain on HRViT-b1, determinism,
resuming after a kill or a real SIGTERM/SIGINT (from a moved data root), a checkpoint that exists
when the final evaluation fails, best.pt, and the data's content digest."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_hooks import hook_env
from torch import nn

from models.weights import sha256 as weights_sha256
from reproduce.cli import main
from reproduce.tables.status import init_of
from reproduce.data import layouts
from reproduce.train import checkpointing, tasks
from reproduce.train.distributed import DistContext
from reproduce.train.evaluation import EvalOptions, evaluate_classification, slide_logits
from reproduce.train.seg_metrics import confusion_matrix, scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
# Real HRViT-b1, kept to a few optimizer steps: 4 generated 32 px images, batch 2, 2 epochs = 4 steps
# (checkpoint at step 2); fine-tuning on 4 generated 64x128 scenes, 64 px crops, batch 2, 2 iterations.
TINY_PRETRAIN = ["--model", "hrvit_b1", "--profile", "smoke", "--synthetic-size", "4", "--batch-size", "2", "--epochs", "2",
                 "--image-size", "32", "--checkpoint-every", "2"]
TINY_FINETUNE = ["--model", "hrvit_b1", "--profile", "smoke", "--dataset", "synthetic", "--synthetic-size", "4", "--batch-size", "2", "--iters", "2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """One uninterrupted tiny pretrain run, shared by the chain and the resume test."""
    root = tmp_path_factory.mktemp("pretrain")
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["pretrain", *TINY_PRETRAIN, "--data-root", str(root / "data"), "--output", str(root / "run")]) == 0
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)
    return root


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# ------------------------------------------------------------------ metrics


def test_miou_matches_a_hand_computed_case_with_mmseg_absent_class_rule():
    # ground truth / prediction over 6 pixels, 4 classes, one ignored pixel:
    # class 0: gt {0,1}, pred {0,4}     -> I 1, U 3 -> 1/3
    # class 1: gt {2,3}, pred {1,2,3}   -> I 2, U 3 -> 2/3
    # class 2: gt {4},   pred {}        -> I 0, U 1 -> 0
    # class 3: absent from both (its only prediction is on the ignored pixel) -> left out of the mean
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 3]])
    conf = confusion_matrix(pred, target, num_classes=4)
    assert conf.sum() == 5 and conf[3].sum() == 0 and conf[:, 3].sum() == 0
    result = scores(conf, ["a", "b", "c", "d"])
    assert result["per_class_iou"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 3), "c": 0.0, "d": None}
    assert result["miou"] == pytest.approx(1 / 3)  # (1/3 + 2/3 + 0) / 3; smp's "absent = 1" would give 0.5
    assert result["pixel_accuracy"] == pytest.approx(3 / 5)
    assert result["classes_scored"] == 3


def test_an_evaluation_casts_each_weight_to_the_autocast_dtype_once():
    """One autocast region for the whole split: three batches, one bf16 copy of each weight (a region per
    batch made three; on a GPU each is a copy kernel per layer per forward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)))
    names = {p.data_ptr(): n for n, p in model.named_parameters()}
    casts: list[str] = []

    class WeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy" and args[0].data_ptr() in names:
                casts.append(names[args[0].data_ptr()])
            return func(*args, **(kwargs or {}))

    with WeightCasts():
        result = evaluate_classification(model, data, DistContext(0, 1, 0, torch.device("cpu")), EvalOptions(2, 0, torch.bfloat16))
    assert result["eval_images"] == 6 and sorted(casts) == sorted(names.values())


def test_confusion_is_accumulated_over_images_not_averaged_per_image():
    # image 1 is all class 0 and correct; image 2 has 1 of 3 class-1 pixels right
    t1, p1 = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    t2, p2 = torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1, 0, 0, 0]])
    conf = confusion_matrix(p1, t1, 2) + confusion_matrix(p2, t2, 2)
    result = scores(conf)
    assert result["per_class_iou"]["0"] == pytest.approx(5 / 7) and result["per_class_iou"]["1"] == pytest.approx(1 / 3)
    assert result["miou"] == pytest.approx((5 / 7 + 1 / 3) / 2)


def test_labels_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), num_classes=3)


class _Pointwise(nn.Module):
    """A per-pixel model: sliding windows must reproduce its whole-image prediction exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def predict(self, x):
        return self.conv(x)


def test_sliding_window_inference_covers_the_image_and_averages_overlaps():
    torch.manual_seed(0)
    model, image = _Pointwise(), torch.randn(1, 3, 64, 160)
    with torch.no_grad():
        whole = model.predict(image)
        for crop, stride in ((64, 48), (32, 24), (96, 64)):  # 96 > height: padded windows
            assert torch.allclose(slide_logits(model, image, 5, crop, stride), whole, atol=1e-6)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--model", "hrvit_b9"], "unknown model 'hrvit_b9'"),
        (["pretrain", "--model", "hrvit_b1", "--lr", "-0.1"], "--lr must be positive"),
        (["pretrain", "--model", "hrvit_b1", "--image-size", "70"], "multiple of 32"),
        (["pretrain", "--model", "mit_b0", "--ablate", "des"], "apply to HRViT models only"),
        (["pretrain", "--model", "hrvit_b1", "--ablate", "bogus"], "unknown HRViT ablation"),
        (["pretrain", "--model", "hrvit_b1", "--dataset", "imagenet"], "needs --data-root"),
        (["finetune", "--model", "hrvit_b1", "--dataset", "cityscapes", "--profile", "paper", "--crop-size", "2048"], "larger than cityscapes"),
        (["finetune", "--model", "hrvit_b1", "--window-sizes", "1", "2", "0", "7"], "positive"),
    ],
)
def test_invalid_settings_are_rejected_before_any_data_is_touched(tmp_path, capsys, argv, message):
    data = tmp_path / "data"
    argv = argv + ["--output", str(tmp_path / "out")] + ([] if "--data-root" in argv or "imagenet" in argv else ["--data-root", str(data)])
    if "cityscapes" in argv:
        argv += ["--data-root", str(data)]  # does not exist: the crop check must fire first
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, message)
    assert not data.exists() and not (tmp_path / "out").exists()


def _assert_one_line_error(err: str, message: str) -> None:
    """``python -m reproduce CMD: error: ...`` on one line, no traceback."""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ": error: " in err and message in err, err


def test_batch_not_divisible_by_world_size_is_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun announces, read before any process group exists
    assert main(["pretrain", "--model", "hrvit_b1", "--batch-size", "7", "--data-root", str(tmp_path / "d"), "--output", str(tmp_path / "o")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "not divisible by world size 2")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ the real chain on HRViT-b1


def test_pretrain_finetune_evaluate_chain(pretrained, tmp_path, capsys):
    pre = _metrics(pretrained / "run")
    for key in ("top1", "top5", "loss", "images_per_s", "wall_time_s", "git_commit"):
        assert key in pre
    assert pre["profile"] == "smoke" and pre["dataset"] == "synthetic" and pre["data_source"] == "generated"
    assert pre["model"] == "hrvit_b1" and pre["model_settings"]["ablate"] == [] and pre["recipe"]["batch_size"] == 2
    assert pre["steps"] == 4 and pre["recipe"]["mixup"] == 0.8 and pre["recipe"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    checkpoint = pretrained / "run" / "checkpoint.pt"
    state = checkpointing.load_checkpoint(checkpoint)
    assert state["finished"] and state["step"] == 4 and state["task"] == "cls" and state["model"] == "hrvit_b1"
    weights = checkpointing.load_run_state(pretrained / "run" / "model.safetensors")  # the slim, cached output
    assert weights["format"] == "hrvit-repro-weights/1" and "optimizer_state" not in weights
    for key in ("task", "model", "model_settings", "num_classes", "class_names", "profile", "dataset", "recipe", "step", "total_steps", "finished"):
        assert weights[key] == state[key], key
    assert weights["model_state"].keys() == state["model_state"].keys()
    assert all(torch.equal(weights["model_state"][k], v) for k, v in state["model_state"].items())

    data = tmp_path / "data"
    assert main(["finetune", *TINY_FINETUNE, "--window-sizes", "1", "2", "7", "7", "--pretrained", str(checkpoint),
                 "--data-root", str(data), "--output", str(tmp_path / "ft")]) == 0
    ft = _metrics(tmp_path / "ft")
    assert ft["init"] == {"format": "hrvit-repro", "file": str(checkpoint), "sha256": weights_sha256(checkpoint)}
    assert ft["pretrained"]["loaded"] > 1000 and ft["pretrained"]["missing"] == [] and ft["pretrained"]["shape_mismatch"] == []
    assert ft["pretrained"]["dropped"] and all(k.startswith("head.") for k in ft["pretrained"]["dropped"])  # only the classifier
    assert 0.0 <= ft["miou"] <= 1.0 and len(ft["per_class_iou"]) == 7 and "pixel_accuracy" in ft
    assert ft["model_settings"]["window_sizes"] == [1, 2, 7, 7] and ft["recipe"]["drop_path"] == 0.15  # b1 Cityscapes-style
    assert ft["recipe"]["lr"] == 6e-5 and ft["recipe"]["head_lr_mult"] == 10 and ft["profile"] == "smoke"

    assert main(["evaluate", "--checkpoint", str(tmp_path / "ft" / "checkpoint.pt"), "--data-root", str(data), "--output", str(tmp_path / "ev")]) == 0
    ev = _metrics(tmp_path / "ev")
    assert ev["miou"] == ft["miou"] and ev["per_class_iou"] == ft["per_class_iou"] and ev["profile"] == "smoke"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ft" / "model.safetensors"), "--data-root", str(data), "--output", str(tmp_path / "ev2")]) == 0
    assert _metrics(tmp_path / "ev2")["miou"] == ft["miou"] and not ev["fused_bn"]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ft" / "model.safetensors"), "--fuse-bn", "--data-root", str(data),
                 "--output", str(tmp_path / "ev3")]) == 0
    ev3 = _metrics(tmp_path / "ev3")  # the merged inference copy: the same scores up to a pixel whose argmax rounding flips
    assert ev3["fused_bn"] and ev3["per_class_iou"] == pytest.approx(ft["per_class_iou"], abs=1e-3)
    assert main(["finetune", *TINY_FINETUNE, "--pretrained", str(pretrained / "run" / "model.safetensors"),
                 "--data-root", str(data), "--output", str(tmp_path / "ft-st")]) == 0
    ft_st = _metrics(tmp_path / "ft-st")
    assert ft_st["pretrained"]["loaded"] == ft["pretrained"]["loaded"] and ft_st["init"]["format"] == "hrvit-repro"
    assert ft_st["pretrained"]["pretrain_profile"] == "smoke" and init_of(ft_st) == ft_st["init"]  # what the tables read

    # a checkpoint of another variant or another model is refused, before any data is read
    capsys.readouterr()
    refused = {
        "was trained with --ablate []": ["--ablate", "des", "--pretrained", str(checkpoint)],
        "holds hrvit_b1, not hrvit_b2": ["--model", "hrvit_b2", "--pretrained", str(checkpoint)],
    }
    for message, flags in refused.items():
        assert main(["finetune", *TINY_FINETUNE, *flags, "--data-root", str(tmp_path / "absent"), "--output", str(tmp_path / "ft2")]) == 2
        _assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "ft2").exists()


def test_killed_run_resumes_to_the_same_metrics_as_an_uninterrupted_run(pretrained, tmp_path, capsys):
    argv = ["pretrain", *TINY_PRETRAIN, "--data-root", str(pretrained / "data")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **hook_env("kill_after_steps", "3")}
    killed = subprocess.run([sys.executable, "-m", "reproduce", *argv, "--output", str(tmp_path / "resumed")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert checkpointing.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2  # step 3 was lost with the process
    (tmp_path / "resumed" / "dvclive" / "metrics.json").write_text("")  # as a kill in the middle of DVCLive's rewrite leaves it

    assert main([*argv, "--output", str(tmp_path / "resumed")]) == 0
    straight, resumed = _metrics(pretrained / "run"), _metrics(tmp_path / "resumed")
    assert resumed["resumed_from_step"] == 2 and straight["resumed_from_step"] is None
    for key in ("top1", "top5", "loss", "param_digests"):  # a separate process, killed and resumed: bit-identical
        assert resumed[key] == straight[key], key

    # a changed recipe does not resume silently: the refusal names what differs
    assert main([*argv, "--lr", "0.002", "--output", str(tmp_path / "resumed")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "different settings (recipe.lr: 0.001 -> 0.002)")


# ------------------------------------------------------------------ preemption, evaluation failures, best.pt, data identity


def _interrupt(argv: list[str], sig: int) -> subprocess.CompletedProcess:
    """Run ``argv`` in a fresh process and send it ``sig`` once its first step is logged."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reproduce", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if " step 1/" in line:
            proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out) + stdout, stderr)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_and_a_rerun_from_a_moved_data_root_ends_bit_identical(pretrained, tmp_path, sig, status):
    data = tmp_path / "data"
    shutil.copytree(pretrained / "data", data)
    argv = ["pretrain", *TINY_PRETRAIN, "--epochs", "2", "--checkpoint-every", "0", "--output", str(tmp_path / "run")]
    done = _interrupt([*argv, "--data-root", str(data)], sig)
    assert done.returncode == status, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    saved = checkpointing.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert f"interrupted at step {saved['step']} of 4; checkpoint saved to {tmp_path / 'run' / 'checkpoint.pt'}; rerun the same command to resume" in done.stderr
    assert 1 <= saved["step"] < 4 and not saved["finished"] and not (tmp_path / "run" / "metrics.json").exists()
    if sig == signal.SIGINT:
        return  # the resume below is the same for both signals; run it once

    moved = tmp_path / "moved"
    data.rename(moved)  # the dataset is staged elsewhere: its content, not its path, is its identity
    assert main([*argv, "--data-root", str(moved)]) == 0
    resumed, reference = _metrics(tmp_path / "run"), _metrics(pretrained / "run")
    assert resumed["resumed_from_step"] == saved["step"] and resumed["data_digest"] == reference["data_digest"]
    for key in ("top1", "top5", "loss", "param_digests"):
        assert resumed[key] == reference[key], key


def test_the_checkpoint_exists_when_the_final_evaluation_fails(pretrained, tmp_path, monkeypatch):
    argv = ["pretrain", *TINY_PRETRAIN, "--epochs", "1", "--data-root", str(pretrained / "data"), "--output", str(tmp_path / "run")]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated out-of-memory in evaluation")

    monkeypatch.setattr(tasks, "evaluate_classification", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        main(argv)
    state = checkpointing.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["finished"] and state["step"] == 2 and (tmp_path / "run" / "model.safetensors").is_file()
    monkeypatch.undo()
    assert main(argv) == 0  # the rerun only evaluates
    assert _metrics(tmp_path / "run")["resumed_from_step"] == 2 and _metrics(tmp_path / "run")["steps_run"] == 0


def test_best_checkpoint_follows_the_metric_and_history_is_recorded(pretrained, tmp_path, monkeypatch):
    scores = iter([60.0, 20.0])  # epoch 1 is the best; the final evaluation is worse

    def scripted(*args, **kwargs):
        return {"top1": next(scores), "top5": 100.0, "loss": 1.0, "eval_images": 4}

    monkeypatch.setattr(tasks, "evaluate_classification", scripted)
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_PRETRAIN, "--epochs", "2", "--eval-every", "1", "--data-root", str(pretrained / "data"), "--output", str(out)]) == 0
    m = _metrics(out)
    assert m["eval_history"] == [{"step": 2, "top1": 60.0}, {"step": 4, "top1": 20.0}] and m["top1"] == 20.0
    assert m["best"] == {"metric": "top1", "value": 60.0, "step": 2, "path": str(out / "best.pt")}
    best = checkpointing.load_run_state(out / "best.pt")
    assert best["step"] == 2 and "optimizer_state" not in best and checkpointing.load_checkpoint(out / "checkpoint.pt")["step"] == 4
    live = json.loads((out / "dvclive" / "metrics.json").read_text())
    assert live["step"] == 4 and live["eval"]["top1"] == 20.0
    for name in ("loss", "lr", "grad_norm", "images_per_s", "memory_mb"):
        rows = (out / "dvclive" / "plots" / "metrics" / "train" / f"{name}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{name}" and [r.split("\t")[0] for r in rows[1:]] == ["1", "2", "3", "4"], name




def test_file_index_digest_is_content_not_path(pretrained, tmp_path):
    root = next((pretrained / "data").glob("cls-*"))
    index = layouts.build_index("imagenet", root, ("train", "val"))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert layouts.build_index("imagenet", copy, ("train", "val"))["digest"] == index["digest"]
    first = sorted((copy / "val").rglob("*.JPEG"))[0]
    first.write_bytes(first.read_bytes() + b"\0")  # one byte more: another dataset
    assert layouts.build_index("imagenet", copy, ("train", "val"))["digest"] != index["digest"]
    classes, samples = layouts.class_samples(index, copy, "train")
    assert len(classes) == 4 and len(samples) == 4 and samples[0][0].is_relative_to(copy)
