#!/usr/bin/env bash
# One GPU run that measures everything (issue 13): about 8 minutes on an H100/H200.
#
#   bash bench/gpu_suite.sh                   # every part
#   bash bench/gpu_suite.sh --parts tests,attention
#   bash bench/gpu_suite.sh --dry-run         # print the parts' commands, run nothing (any machine)
#
# Parts, each under its own timeout (seconds, env LYNX_SUITE_T_<PART>) so a hung part cannot eat
# the budget; a part only starts while the whole suite (LYNX_SUITE_BUDGET_S, default 450) has time:
#   tests              the tests that skip without CUDA (bench/cuda_tests.py lists them)
#   overhead           bench/lynx_overhead.py --shape 14b: Lynx-patched / plain, bf16, eager
#   overhead_compiled  the same with the diffusion model under torch.compile (TorchCompileModel's way)
#   blockswap          bench/blockswap.py: 40 14B blocks at 480x832x81, 24 GiB cap vs resident vs .to()
#   attention          bench/attention_backends.py: SDPA kernels, flash-attn, SageAttention at 14B shapes
#   train              bench/train_step.py --skip-full: the LoRA training step, resident and at 24 GiB
# Every figure is one "RESULT {json}" line on stdout (the benchmarks print them; the suite prints
# one for the tests and one summary at the end). Full logs: LYNX_SUITE_LOGS (default a temp dir).
# Without a CUDA GPU it says so and exits 0. Record the numbers in bench/README.md ("GPU suite").
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi

ALL_PARTS="tests,overhead,overhead_compiled,blockswap,attention,train"
PARTS="$ALL_PARTS"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --parts) PARTS="$2"; shift 2 ;;
    --parts=*) PARTS="${1#--parts=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument '$1' (use --parts LIST, --dry-run, --help)" >&2; exit 2 ;;
  esac
done
for p in ${PARTS//,/ }; do
  case ",$ALL_PARTS," in *",$p,"*) ;; *) echo "gpu_suite: unknown part '$p'; parts: $ALL_PARTS" >&2; exit 2 ;; esac
done

BUDGET_S="${LYNX_SUITE_BUDGET_S:-450}"
declare -A LIMIT=(
  [tests]="${LYNX_SUITE_T_TESTS:-75}"
  [overhead]="${LYNX_SUITE_T_OVERHEAD:-60}"
  [overhead_compiled]="${LYNX_SUITE_T_OVERHEAD_COMPILED:-80}"
  [blockswap]="${LYNX_SUITE_T_BLOCKSWAP:-120}"
  [attention]="${LYNX_SUITE_T_ATTENTION:-45}"
  [train]="${LYNX_SUITE_T_TRAIN:-70}"
)
LOGS="${LYNX_SUITE_LOGS:-<logs>}"

command_of() {  # the command line of one part
  case "$1" in
    tests) echo "$PY -m pytest -q -p no:cacheprovider -rfEs --junitxml=$LOGS/cuda_tests.xml $($PY bench/cuda_tests.py | tr '\n' ' ')" ;;
    overhead) echo "$PY bench/lynx_overhead.py --shape 14b --device cuda --dtypes bf16 --rounds 3" ;;
    overhead_compiled) echo "$PY bench/lynx_overhead.py --shape 14b --device cuda --dtypes bf16 --rounds 3 --compile-model" ;;
    blockswap) echo "$PY bench/blockswap.py --device cuda --blocks 40 --steps 1 --vram-cap-gb 24" ;;
    attention) echo "$PY bench/attention_backends.py --device cuda --dtypes bf16,fp16 --iters 5 --warmup 2" ;;
    train) echo "$PY bench/train_step.py --device cuda --skip-full --steps 1" ;;
  esac
}

if [ "$DRY" = 1 ]; then
  for p in ${PARTS//,/ }; do echo "PART $p (timeout ${LIMIT[$p]} s): $(command_of "$p")"; done
  exit 0
fi

GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
# LYNX_SUITE_FAKE_GPU (tests/test_gpu_suite.py only): drive the loop on a machine without a GPU.
[ -z "$GPU" ] && GPU="${LYNX_SUITE_FAKE_GPU:-}"
if [ -z "$GPU" ]; then
  echo "gpu_suite: no CUDA GPU found (torch.cuda.is_available() is False with $PY); nothing to measure."
  exit 0
fi
[ "$LOGS" = "<logs>" ] && LOGS="$(mktemp -d "${TMPDIR:-/tmp}/lynx_gpu_suite.XXXXXX")"
mkdir -p "$LOGS"
echo "gpu_suite: $GPU, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S} s, logs in $LOGS"

START=$(date +%s)
declare -A STATUS SECONDS_OF COUNT
ORDER=()
for p in ${PARTS//,/ }; do
  ORDER+=("$p")
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  limit=${LIMIT[$p]}
  if [ "$left" -lt 15 ]; then STATUS[$p]="not_run_budget"; SECONDS_OF[$p]=0; COUNT[$p]=0; continue; fi
  [ "$limit" -gt "$left" ] && limit=$left
  cmd="$(command_of "$p")"
  echo "PART $p (timeout $limit s): $cmd"
  t0=$(date +%s)
  # RESULT lines stream through as they come; everything goes to the part's log.
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$LOGS/$p.log" 2>&1 &
  pid=$!
  tail -n +1 -f "$LOGS/$p.log" --pid=$pid 2>/dev/null | grep --line-buffered '^RESULT ' &
  tailer=$!
  wait $pid; rc=$?
  wait $tailer 2>/dev/null
  SECONDS_OF[$p]=$(( $(date +%s) - t0 ))
  COUNT[$p]=$(grep -c '^RESULT ' "$LOGS/$p.log")
  case $rc in
    0) STATUS[$p]="ok" ;;
    124|137) STATUS[$p]="timeout" ;;
    *) STATUS[$p]="failed_rc_$rc" ;;
  esac
  if [ "$p" = tests ]; then
    "$PY" - "$LOGS/cuda_tests.xml" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as err:
    print("RESULT " + json.dumps({"suite": "cuda_tests", "error": f"no junit report: {err}"}))
    raise SystemExit(0)
cases = root.iter("testcase")
out = {"suite": "cuda_tests", "passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
for c in cases:
    name = f"{c.get('classname')}::{c.get('name')}"
    if c.find("failure") is not None or c.find("error") is not None:
        out["failed"] += 1; out["failures"].append(name)
    elif c.find("skipped") is not None:
        out["skipped"] += 1; out["skips"].append(name)
    else:
        out["passed"] += 1
print("RESULT " + json.dumps(out))
PYEOF
    COUNT[$p]=1
  fi
  if [ "${STATUS[$p]}" != ok ]; then
    echo "PART $p: ${STATUS[$p]} after ${SECONDS_OF[$p]} s; last lines of $LOGS/$p.log:"
    grep -v '^RESULT ' "$LOGS/$p.log" | tail -n 8 | sed 's/^/    /'
  fi
done

TOTAL=$(( $(date +%s) - START ))
echo "SUMMARY part               status          seconds  RESULT lines"
parts_json=""
for p in "${ORDER[@]}"; do
  printf 'SUMMARY %-18s %-15s %7s  %s\n' "$p" "${STATUS[$p]}" "${SECONDS_OF[$p]}" "${COUNT[$p]}"
  parts_json="$parts_json\"$p\": {\"status\": \"${STATUS[$p]}\", \"seconds\": ${SECONDS_OF[$p]}, \"results\": ${COUNT[$p]}},"
done
echo "RESULT {\"suite\": \"gpu_suite\", \"gpu\": \"$GPU\", \"date\": \"$(date -u +%Y-%m-%d)\", \"total_s\": $TOTAL, \"logs\": \"$LOGS\", \"parts\": {${parts_json%,}}}"
exit 0
