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


def test_bench_variants_in_one_process_append_jsonl_rows(capsys, tmp_path, monkeypatch):
    """Each variant is its own row; every row goes to the JSON lines file as it is measured. torch.compile
    is replaced by the identity here (compiling takes minutes on CPU): the compiled row's code path runs."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    lines = tmp_path / "bench.jsonl"
    argv = ["bench", "--models", "mit_b0", "--variants", "eager", "compile", "--same-process", "--size", "32", "32",
            "--runs", "1", "--warmup", "0", "--threads", "1", "--jsonl", str(lines), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    eager, compiled = result["results"]
    assert (eager["model"], compiled["model"]) == ("mit_b0", "mit_b0+compile") and result["failed"] == []
    assert compiled["variant"] == "compile" and compiled["compile_s"] == compiled["first_step_s"] > 0
    assert "compile_s" not in eager and eager["first_step_s"] > 0
    for row in (eager, compiled):  # the profiled pass: aten ops on every device, kernels only on CUDA
        assert row["profiled_aten_ops"] > 0 and row["kernels_per_pass"] is None and row["gpu_busy_fraction"] is None
        assert row["peak_total_mib"] >= row["forward_peak_mib"]
    written = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [(w["bench"], w["model"], w["round"]) for w in written] == [("row", "mit_b0", 1), ("row", "mit_b0+compile", 1)]
    assert written[0]["images_per_s"] == pytest.approx(1 / written[0]["latency_s"]) and written[0]["options"]["size"] == [32, 32]


def _fake_row(config):
    return {"model": config["model"], "variant": config["variant"], "params": 1, "gmacs": 1.0, "latency_s": 0.5,
            "latencies_s": [0.5], "cpu_s": 0.5, "forward_peak_mib": 1.0, "peak_total_mib": 2.0, "first_step_s": 1.0,
            "profiled_aten_ops": 10, "kernels_per_pass": None, "gpu_busy_s": None}


def test_bench_reports_a_failed_row_and_skips_rows_past_the_budget(capsys, tmp_path, monkeypatch):
    """Row 1 fails, row 2 outlasts the 1.5 s budget, so row 3 is not started: each says so, and the run
    still reports row 2 (exit 1: a row failed)."""
    import time

    def fake_bench_one(config):
        if config["model"] == "hrvit_b1":
            raise ValueError("no such kernel")
        time.sleep(1.6)
        return _fake_row(config)

    monkeypatch.setattr(reproduce.bench, "bench_one", fake_bench_one)
    lines = tmp_path / "bench.jsonl"
    argv = ["bench", "--models", "hrvit_b1", "mit_b0", "mit_b1", "--same-process", "--budget-s", "1.5", "--runs", "1",
            "--size", "32", "32", "--threads", "1", "--jsonl", str(lines), "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [r["model"] for r in result["results"]] == ["mit_b0"]
    failed = {f["model"]: f for f in result["failed"]}
    assert "ValueError: no such kernel" in failed["hrvit_b1"]["error"] and not failed["hrvit_b1"]["skipped"]
    assert failed["mit_b1"]["skipped"] and "--budget-s 1.5 spent" in failed["mit_b1"]["error"]
    assert "bench: mit_b1 (round 1): skipped" in captured.err
    assert [json.loads(line)["bench"] for line in lines.read_text().splitlines()] == ["failed", "row", "failed"]


def test_gpu_busy_time_counts_overlapping_kernels_once():
    assert reproduce.bench._busy_seconds([(20.0, 30.0), (0.0, 10.0), (5.0, 15.0)]) == pytest.approx(25e-6)
    assert reproduce.bench._busy_seconds([]) == 0.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "cuda-graphs"], "--variants cuda-graphs captures CUDA graphs; add --device cuda"),
        (["--compile", "--variants", "eager", "compile"], "--compile pairs eager with torch.compile"),
        (["--budget-s", "0"], "--budget-s must be > 0"),
        (["--same-process", "--against", str(Path(__file__).resolve().parents[1])], "drop --same-process"),
    ],
)
def test_bench_variant_options_checked_before_any_build(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def _train_row(model, variant, task, size, images_per_s, gmac_per_s):
    return {"bench": "row", "model": model if variant == "eager" else f"{model}+{variant}", "variant": variant,
            "images_per_s": images_per_s, "gmac_per_s": gmac_per_s,
            "options": {"mode": "train", "task": task, "size": [size, size]}}


def test_plan_from_measured_images_per_second(capsys, tmp_path, fixed_flops):
    """The stage measured at its task and size takes the fastest variant's images/s; the same model at
    another size its GMAC/s, from the same task when measured (here seg 512 for Cityscapes' 1024 crops,
    though cls 224 ran at more GMAC/s); a model not measured the assumed share of the peak, labelled so."""
    lines = [_train_row("hrvit_b3", "eager", "cls", 224, 100.0, 500.0), _train_row("hrvit_b3", "cuda-graphs", "cls", 224, 300.0, 1500.0),
             _train_row("hrvit_b3", "eager", "seg", 512, 10.0, 800.0),
             _train_row("hrvit_b3@abc123", "eager", "cls", 224, 9000.0, 9000.0), {"bench": "loader", "images_per_s": 5.0},
             _train_row("hrvit_b1", "eager", "seg", 512, 50.0, 400.0) | {"options": {"mode": "infer", "task": "seg", "size": [512, 512]}}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["plan", "--tables", "table7_window", "table3_pretrain", "--measured", str(tmp_path / "bench.jsonl"),
                 "--gpu-type", "H100", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    stages = {s["stage"]: s for t in result["tables"].values() for s in t["stages"]}
    pretrain = stages["pretrain@hrvit_b3"]
    assert pretrain["gpu_hours"] == pytest.approx(pretrain["images"] / 300.0 / 3600)
    assert pretrain["source"] == "measured: 300 img/s (cuda-graphs)"
    finetune = stages["finetune_cityscapes@hrvit_b3"]
    assert finetune["gpu_hours"] == pytest.approx(finetune["images"] * 30.0 / (2 * 800.0) / 3600)
    assert finetune["source"] == "measured GMAC/s at seg 512 px (eager)"
    other = stages["pretrain@hrvit_b1"]  # only measured in inference: the assumption, labelled
    assert other["source"].startswith("ASSUMED: H100 at 5%")
    assert other["gpu_hours"] == pytest.approx(other["images"] * 30.0 / (2 * GPU_PEAK_TFLOPS["H100"] * 1e3 / 2 * 0.05) / 3600)
    assert "images/s measured in" in result["assumption"] and "ASSUMED" in result["assumption"]
    assert f"plan: [1/{len(stages) + 1}] table7_window: pretrain@hrvit_b3" in captured.err  # progress, one line per stage


def test_plan_reads_a_doctor_report(capsys, tmp_path, fixed_flops):
    bench = {"options": {"mode": "train", "task": "cls", "size": [224, 224]},
             "results": [{"model": "hrvit_b3", "variant": "eager", "images_per_s": 200.0, "gmac_per_s": 800.0}]}
    report = {"passed": True, "parts": [{"part": "step time (bench)", "bench": bench}, {"part": "evaluate", "passed": True}]}
    (tmp_path / "doctor.json").write_text(json.dumps(report))
    assert main(["plan", "--tables", "table7_window", "--measured", str(tmp_path / "doctor.json"), "--json"]) == 0
    pretrain = json.loads(capsys.readouterr().out)["tables"]["table7_window"]["stages"][0]
    assert pretrain["gpu_hours"] == pytest.approx(pretrain["images"] / 200.0 / 3600)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not a doctor report or bench result"),
        (json.dumps({"bench": "loader", "images_per_s": 5.0}), "no training-step measurement"),
    ],
)
def test_plan_measured_errors(capsys, tmp_path, content, message):
    (tmp_path / "m.json").write_text(content)
    assert main(["plan", "--measured", str(tmp_path / "m.json")]) == 2
    assert message in capsys.readouterr().err
