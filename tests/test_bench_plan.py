"""CLI contracts of ``bench`` (modes, tasks, flags, JSON keys, errors before any build) and ``plan``
(stages per table, cost arithmetic, throughput file, errors)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import reproduce.bench
import reproduce.plan
from reproduce.cli import main
from reproduce.plan import GPU_PEAK_TFLOPS, IMAGENET_TRAIN_IMAGES


def test_bench_train_cls_json(capsys):
    argv = ["bench", "--mode", "train", "--task", "cls", "--batch-size", "2", "--size", "64", "64", "--runs", "1",
            "--warmup", "0", "--threads", "1", "--models", "hrvit_b1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["options"]["mode"] == "train" and result["options"]["num_classes"] == 1000
    assert "torch" in result["gmacs_count"] and result["step_macs"] == "3x forward per image"
    row = result["results"][0]
    assert row["params"] == 19_685_152  # the classifier (Table 3)
    assert row["images_per_s"] == pytest.approx(2 / row["latency_s"])
    assert row["gmac_per_s"] == pytest.approx(3 * 2 * row["gmacs"] / row["latency_s"])
    assert row["percent_of_peak"] == pytest.approx(100 * row["gmac_per_s"] / result["matmul_peak_gmac_per_s"])
    assert row["forward_peak_mib"] > 0 and 0 < row["cpu_s"] and result["reference"] is None


def test_bench_table_names_its_gmac_count(capsys):
    assert main(["bench", "--runs", "1", "--warmup", "0", "--size", "64", "64", "--models", "hrvit_b1",
                 "--channels-last", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "channels-last" in out and "GMAC/img = torch FlopCounterMode FLOPs / 2" in out and "% peak" in out


def test_bench_rounds_against_another_checkout(capsys):
    """Two alternating rounds of this checkout against itself as the 'other' checkout: one row per
    (model, checkout), medians over rounds, and each round's ratio to the chosen reference."""
    repo = Path(__file__).resolve().parents[1]
    argv = ["bench", "--models", "hrvit_b1", "--against", str(repo), "--rounds", "2", "--runs", "1", "--warmup", "0",
            "--size", "32", "32", "--threads", "1", "--json"]
    rev = reproduce.bench._revision(repo)  # the short commit, or the folder name outside git
    assert main([*argv, "--reference", f"hrvit_b1@{rev}"]) == 0
    result = json.loads(capsys.readouterr().out)
    here, there = result["results"]
    assert (here["model"], there["model"], result["rounds"]) == ("hrvit_b1", f"hrvit_b1@{rev}", 2)
    assert len(here["latencies_s"]) == 2 and here["latency_s"] == pytest.approx(statistics.median(here["latencies_s"]))
    assert there["latency_vs_reference_rounds"] == [1.0, 1.0] and len(here["latency_vs_reference_rounds"]) == 2
    assert here["latency_vs_reference"] == pytest.approx(statistics.median(here["latency_vs_reference_rounds"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "cls", "--models", "smp_mit_b1"], "smp_mit_b1 is a segmentation model"),
        (["--rounds", "0"], "--runs and --rounds must be >= 1"),
        (["--against", "/nonexistent"], "not a checkout of this project"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--amp", "bf16"], "--amp is CUDA autocast"),
        (["--data", "imagenet", "--workers", "-1"], "--workers must be >= 0"),
    ],
)
def test_bench_errors_before_any_build(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_data_loader(capsys):
    pytest.importorskip("reproduce.data.throughput")
    assert main(["bench", "--data", "imagenet", "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"dataset", "root", "workers", "batch_size", "images", "seconds", "images_per_s"} <= set(result)
    assert result["images_per_s"] == pytest.approx(result["images"] / result["seconds"])


@pytest.fixture
def fixed_flops(monkeypatch):
    """Plan arithmetic without the ledger: 10 forward GFLOPs and 1M params for every model."""
    monkeypatch.setattr(reproduce.plan, "_forward_gflops_and_params", lambda *args: (10.0, 1_000_000))


def test_plan_table7_stages_and_arithmetic(capsys, fixed_flops):
    assert main(["plan", "--tables", "table7_window", "--gpus", "4", "--gpu-type", "H100", "--efficiency", "0.5",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in result["tables"]["table7_window"]["stages"]}
    assert set(stages) == {"pretrain@hrvit_b3"} | {f"finetune_cityscapes@hrvit_b3{w}" for w in ("", "-w7", "-w11", "-w13", "-w15")}
    pretrain = stages["pretrain@hrvit_b3"]
    assert pretrain["images"] == 300 * IMAGENET_TRAIN_IMAGES and pretrain["size"] == 224
    assert pretrain["gflops_per_image"] == 30.0  # forward x 3
    rate = GPU_PEAK_TFLOPS["H100"] * 1e3 / 2 * 0.5  # GMAC/s
    assert pretrain["gpu_hours"] == pytest.approx(pretrain["images"] * 30.0 / (2 * rate) / 3600)
    assert stages["finetune_cityscapes@hrvit_b3"]["images"] == 160_000 * 8
    assert pretrain["disk_gb"] == pytest.approx(0.012)
    total = result["tables"]["table7_window"]
    assert total["wall_hours"] == pytest.approx(total["gpu_hours"] / 4)
    assert "H100 at 50%" in result["assumption"]


def test_plan_shared_stages_counted_once(capsys, fixed_flops):
    assert main(["plan", "--tables", "table3_pretrain", "table7_window", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    per_table = sum(len(t["stages"]) for t in result["tables"].values())
    assert result["all"]["stages"] == per_table - 1  # pretrain@hrvit_b3 is in both


def test_plan_from_measured_throughput(capsys, tmp_path, fixed_flops):
    bench = {"options": {"mode": "train"}, "results": [{"model": "hrvit_b3", "gmac_per_s": 1000.0}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert main(["plan", "--tables", "table7_window", "--throughput", str(tmp_path / "bench.json"), "--json"]) == 0
    pretrain = json.loads(capsys.readouterr().out)["tables"]["table7_window"]["stages"][0]
    assert pretrain["gpu_hours"] == pytest.approx(pretrain["images"] * 30.0 / 2000.0 / 3600)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "0"], "--gpus must be >= 1"),
        (["--tables", "table9"], "unknown table(s) ['table9']"),
        (["--efficiency", "1.5"], "--efficiency must be in (0, 1]"),
        (["--throughput", "/nonexistent.json"], "not a `bench --json` result"),
    ],
)
def test_plan_errors(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err
