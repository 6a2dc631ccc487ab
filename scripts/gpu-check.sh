#!/usr/bin/env bash
# First run on one CUDA GPU, in under 8 minutes (each step has its own time limit):
#   1. `vlmalign bench` for align, align-cg and align-clip in bf16 (optimised vs naive step,
#      ms, samples/s, memory, MFU);
#   2. two short training runs with evaluation, align and align-clip, in bf16;
#   3. the align run again with train.compile=true (compile time, compiled step time).
# Writes benchmarks/results/gpu-<gpu>-<date>-bench-bf16.json (the bench's own JSON) and
# benchmarks/results/gpu-<gpu>-<date>.json (environment, each step's command, exit code
# and wall time, step times from the training logs, evaluation metrics). A failing step is
# recorded and the next one runs; the exit code is the number of failed steps.
#
#   scripts/gpu-check.sh                     # on the GPU machine, from a set-up checkout
#   scripts/gpu-check.sh llm.name=gemma3-270m  # extra overrides for every step
#   VLMALIGN_GPU_CHECK_CPU=1 scripts/gpu-check.sh  # the same sequence on the CPU with tiny
#                                                  # random models: checks the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
VLMALIGN=${VLMALIGN:-$( [ -x .venv/bin/vlmalign ] && echo .venv/bin/vlmalign || echo vlmalign )}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
CPU_SMOKE=${VLMALIGN_GPU_CHECK_CPU:-0}
EXTRA=("$@")

if [ "$CPU_SMOKE" != 1 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: torch sees no CUDA GPU here ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>&1));" \
       "install the torch build for this machine's CUDA, or set VLMALIGN_GPU_CHECK_CPU=1 to test the script on the CPU" >&2
  exit 2
fi

if [ "$CPU_SMOKE" = 1 ]; then
  GPU=cpu-smoke
  MODELS=(llm.name=tiny vision.tower=tiny projector.pool_size=2 objective.patch_pool=2)
  BENCH_MODELS=(--llm tiny --tower tiny)
  BENCH_LIMIT=300; TRAIN_LIMIT=240; COMPILE_LIMIT=300; STEPS=6; SHAPES=96; BATCH=8
else
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z' | sed 's/-$//')
  GPU=${GPU:-cuda}
  MODELS=()
  BENCH_MODELS=()
  # Limits sum to 7 min (7 min 20 s with the kill grace); typical H100 times are far below.
  BENCH_LIMIT=170; TRAIN_LIMIT=70; COMPILE_LIMIT=110; STEPS=60; SHAPES=800; BATCH=16
fi
STAMP=$(date -u +%Y%m%d-%H%M)
TAG="gpu-${GPU}-${STAMP}"
WORK=${VLMALIGN_GPU_CHECK_DIR:-runs/gpu-check/$STAMP}
RESULTS=benchmarks/results
[ "$CPU_SMOKE" = 1 ] && RESULTS=$WORK  # a smoke test's figures are not results
mkdir -p "$RESULTS" "$WORK"
STEPS_LOG="$WORK/steps.tsv"
: > "$STEPS_LOG"
FAILED=0

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $WORK/NAME.log, record
# name, exit code, wall seconds and the command.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s%N)
  timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  local wall=$(printf '%d.%03d' $((wall_ms / 1000)) $((wall_ms % 1000)))
  tail -n 5 "$WORK/$name.log"
  [ $rc -ne 0 ] && FAILED=$((FAILED + 1)) && echo "   -> exit $rc (124: time limit), see $WORK/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$wall" "$*" >> "$STEPS_LOG"
}

COMMON=(train.mixed_precision=bf16 "${MODELS[@]}" "${EXTRA[@]}")
RUN=(data.root="$WORK/shapes" data.shapes_n=$SHAPES train.max_steps=$STEPS train.batch_size=$BATCH
     train.log_every=5 data.eval_max_samples=80)

step bench-bf16 $BENCH_LIMIT "$VLMALIGN" bench --recipes align,align-cg,align-clip "${BENCH_MODELS[@]}" \
  --data-root "$WORK/bench-shapes" --json "$RESULTS/$TAG-bench-bf16.json" "${COMMON[@]}"
step train-align $TRAIN_LIMIT "$VLMALIGN" train align "${RUN[@]}" train.out_dir="$WORK/align" "${COMMON[@]}"
step train-align-clip $TRAIN_LIMIT "$VLMALIGN" train align-clip "${RUN[@]}" train.out_dir="$WORK/align-clip" "${COMMON[@]}"
step train-align-compile $COMPILE_LIMIT "$VLMALIGN" train align "${RUN[@]}" train.out_dir="$WORK/align-compile" \
  train.compile=true train.eval_at_end=false "${COMMON[@]}"

"$PYTHON" - "$WORK" "$RESULTS/$TAG.json" "$RESULTS/$TAG-bench-bf16.json" <<'EOF'
"""Collect the steps' exit codes and times, the training logs and evaluations into one JSON."""
import json, os, platform, subprocess, sys
from pathlib import Path

work, out, bench = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
import torch

def gpu():
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count, "nvidia_smi": smi}

def history(run):
    f = next(iter(sorted(run.rglob("history.jsonl"))), None)
    if f is None:
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

def metrics(run):
    found = sorted(run.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None

steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, wall, cmd = line.split("\t", 3)
    entry = {"name": name, "exit_code": int(rc), "wall_s": round(float(wall), 1), "command": cmd}
    run = work / name.removeprefix("train-")
    if name.startswith("train-") and run.is_dir():
        h = history(run)
        times = [r["s_per_step"] for r in h if "s_per_step" in r]
        entry["history"] = h
        entry["s_per_step_first_logged"] = times[0] if times else None
        entry["s_per_step_last_logged"] = times[-1] if times else None  # after compile / warm-up
        entry["eval"] = metrics(run)
    steps.append(entry)

record = {
    "what": "scripts/gpu-check.sh: vlmalign bench (align, align-cg, align-clip, bf16), two short bf16 runs with "
            "evaluation (align, align-clip) and align with train.compile=true",
    "gpu": gpu(),
    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    "cpu_count": os.cpu_count(), "load_avg_end": list(os.getloadavg()),
    "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "bench_json": str(bench) if bench.exists() else None,
    "steps": steps,
    "failed_steps": [s["name"] for s in steps if s["exit_code"] != 0],
}
out.write_text(json.dumps(record, indent=1))
print(f"wrote {out}" + (f" and {bench}" if bench.exists() else ""))
EOF
echo "gpu-check: $FAILED failed step(s); logs in $WORK"
exit $FAILED
