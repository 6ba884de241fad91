"""The GPU slot's figures in one page: ``python scripts/gpu/summarise.py OUT`` reads what
``run_checks.sh`` wrote to OUT (bench.jsonl, doctor.json, checks.jsonl) and prints every bench row
(images/s, latency, first pass, kernels per pass, GPU-busy share, peak memory), the loader, the
self-check's parts and any part that failed or was skipped. Files a cut-off run did not write are
left out."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short when the run was stopped
    return records


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def bench_lines(records: list[dict]) -> list[str]:
    lines = [f"{'mode':<5} {'task':<4} {'size':>4} {'batch':>5}  {'model':<26} {'img/s':>8} {'ms':>8} {'first s':>7} "
             f"{'kernels':>7} {'busy %':>6} {'peak GiB':>8}"]
    for r in records:
        o = r.get("options", {})
        model = r["model"] + (" merged" if r.get("fused_bn") else "")  # bench --fuse-bn: the inference copy
        head = f"{o.get('mode', '?'):<5} {o.get('task', '?'):<4} {o.get('size', ['?'])[0]:>4} {o.get('batch_size', '?'):>5}  {model:<26}"
        if r["bench"] == "row":
            busy = r.get("gpu_busy_fraction")
            lines.append(f"{head} {r['images_per_s']:>8.1f} {1e3 * r['latency_s']:>8.1f} {r['first_step_s']:>7.1f} "
                         f"{_num(r.get('kernels_per_pass'), 'd'):>7} {_num(None if busy is None else 100 * busy, '.0f'):>6} "
                         f"{r['peak_total_mib'] / 1024:>8.2f}" + (f"  compile {r['compile_s']:.0f} s" if "compile_s" in r else ""))
        elif r["bench"] == "failed":
            lines.append(f"{head} not measured: {r['error'].strip().splitlines()[-1][:100]}")
    return lines


def main(out: Path) -> None:
    env = next((c["env"] for c in _lines(out / "checks.jsonl") if c.get("part") == "env"), None)
    print(f"environment: {json.dumps(env)}")
    records = _lines(out / "bench.jsonl")
    print("\n".join(bench_lines([r for r in records if r.get("bench") in ("row", "failed")])))
    for r in (r for r in records if r.get("bench") == "loader"):
        print(f"loader: {r['dataset']} ({r['root'] or 'generated'}), {r['workers']} workers, batch {r['batch_size']}: "
              f"{r['images_per_s']:.0f} images/s ({r['images']} images in {r['seconds']:.1f} s)")
    doctor = out / "doctor.json"
    if doctor.is_file():
        report = json.loads(doctor.read_text())
        print(f"self-check: {'PASS' if report['passed'] else 'FAIL'}{'' if report.get('complete', True) else ' (incomplete)'}, "
              f"{report['seconds']:.0f} s")
        for p in report["parts"]:
            figures = ", ".join(f"{k} {p[k]}" for k in ("first_step_s", "step_s", "images_per_s", "compile_s", "top1", "min_top1",
                                                         "reason", "status") if k in p)
            print(f"  {p['part']}: {'skipped' if p.get('skipped') else 'pass' if p['passed'] else 'FAIL'} ({figures})")
    for c in _lines(out / "checks.jsonl"):
        if c.get("skipped") or c.get("rc", 0) != 0:
            print(f"part {c['part']}: {'skipped: ' + c['reason'] if c.get('skipped') else 'exit ' + str(c['rc'])}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
