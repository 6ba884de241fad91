#!/usr/bin/env bash
# The GPU slot's one script: the speed figures of issue 16 and the self-check, within ~8 minutes.
#
#   OUT=/some/folder scripts/gpu/run_checks.sh [--tiny]
#
# Run from the repository root with the packages importable (it installs nothing). Every part
# runs under its own `timeout`, inside one overall budget (CHECKS_BUDGET_S, default 470 s): a part
# gets what is left, a part with under 15 s left is skipped with a line saying so. Results go to
# $OUT as they come: bench.jsonl (one line per bench row, failed or skipped row), doctor.json,
# checks.jsonl (one line per part: exit status and seconds), NAME.out / NAME.log per part;
# summary.txt (and stdout) last. --tiny: the same parts at tiny sizes on the CPU (a smoke test of
# this script, figures mean nothing). CHECKS_ONLY="self-check compile-cls" runs only the parts named
# (train-cls infer-seg infer-seg-merged train-seg loader self-check compile-cls), e.g. in a second slot.
set -u

: "${OUT:?set OUT to the folder the results go to}"
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${CHECKS_BUDGET_S:-470}

if [[ "${1:-}" == "--tiny" ]]; then
  DEVICE=(--device cpu); DOCTOR=(--device cpu --tiny --parts learn step-time); VARIANTS=(eager)
  CLS=(--size 32 32 --batch-size 2); SEG=(--size 64 64 --batch-size 1); RUNS=(--runs 1 --warmup 0)
  CLS_MODELS=(hrvit_b1 mit_b0); SEG_MODELS=(hrvit_b1 smp_mit_b1); WORKERS=2; COMPILE_MODELS=(mit_b0)
else
  DEVICE=(--device cuda --amp bf16); DOCTOR=(--device cuda --parts learn step-time compile); VARIANTS=(eager cuda-graphs)
  CLS=(--size 224 224 --batch-size 128); SEG=(--size 512 512 --batch-size 16); RUNS=(--runs 5 --warmup 1)
  CLS_MODELS=(hrvit_b1 mit_b1 hrvit_b3); SEG_MODELS=(hrvit_b1 mit_b1 smp_mit_b1); WORKERS=16; COMPILE_MODELS=(mit_b1 hrvit_b1)
fi

note() { # one JSON line in checks.jsonl and on stdout
  echo "$1" | tee -a "$OUT/checks.jsonl"
}

# part NAME SECONDS COMMAND...: COMMAND under `timeout`, given at most SECONDS of what is left;
# the command may read $PART_S (its own limit, for its --budget-s).
part() {
  local name=$1 want=$2; shift 2
  if [[ -n "${CHECKS_ONLY:-}" && " $CHECKS_ONLY " != *" $name "* ]]; then return; fi
  local left=$(( START + BUDGET - $(date +%s) ))
  local limit=$(( want < left ? want : left ))
  if (( limit < 15 )); then
    note "{\"part\": \"$name\", \"skipped\": true, \"reason\": \"${left} s of the ${BUDGET} s budget left\"}"
    return
  fi
  export PART_S=$(( limit - 20 ))  # the command's own budget (after its start-up) ends first: it reports what it skipped
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
  local rc=$?
  note "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit_s\": $limit}"
}

bench() { # bench NAME SECONDS BENCH-OPTIONS...: rows to bench.jsonl, the summary JSON to NAME.out
  local name=$1 want=$2; shift 2
  part "$name" "$want" bash -c '"$@" --budget-s "$PART_S"' _ \
    "$PYTHON" -m reproduce bench "${DEVICE[@]}" --same-process --jsonl "$OUT/bench.jsonl" --json "${RUNS[@]}" "$@"
}

"$PYTHON" - >"$OUT/env.json" 2>>"$OUT/env.log" <<'EOF'
import json, os, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if cuda else None,
                  "cpus": os.cpu_count(), "python": platform.python_version()}))
EOF
note "{\"part\": \"env\", \"env\": $(cat "$OUT/env.json" 2>/dev/null || echo null)}"

# most wanted first: a cut-off run keeps the figures the issue's table needs. The self-check runs its
# learning check (~2.5 min) first; its step time repeats train-cls's hrvit_b1 row for doctor.json, and
# compiling (HRViT-b1: over 100 s) gets what is left, here and in compile-cls.
bench train-cls 110 --mode train --task cls "${CLS[@]}" --models "${CLS_MODELS[@]}" --variants "${VARIANTS[@]}"
bench infer-seg 50 --mode infer --task seg "${SEG[@]}" --models hrvit_b1 smp_mit_b1 --variants "${VARIANTS[@]}"
bench infer-seg-merged 30 --mode infer --task seg "${SEG[@]}" --models hrvit_b1 --fuse-bn --variants "${VARIANTS[@]}"
bench train-seg 75 --mode train --task seg "${SEG[@]}" --models "${SEG_MODELS[@]}" --variants "${VARIANTS[@]}"
part loader 35 "$PYTHON" -m reproduce bench --data imagenet --workers "$WORKERS" --jsonl "$OUT/bench.jsonl" --json
part self-check 250 bash -c '"$@" --budget-s "$PART_S"' _ \
  "$PYTHON" -m reproduce doctor "${DOCTOR[@]}" --output "$OUT/doctor.json"
bench compile-cls 300 --mode train --task cls "${CLS[@]}" --models "${COMPILE_MODELS[@]}" --variants compile

"$PYTHON" scripts/gpu/summarise.py "$OUT" | tee "$OUT/summary.txt"
