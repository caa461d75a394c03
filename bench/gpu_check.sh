#!/usr/bin/env bash
# The checks that need NVIDIA GPUs, in one go, for the day a GPU machine is at hand:
#   1. the tests marked `gpu` (CUDA training, GPU detection, a run too big for the GPU refused before loading),
#   2. a DDP run on every local GPU (`accelerate launch`, the sample data, the quick preset),
#      with its measured peak memory beside tuner's formula (docs/memory.md),
#   3. the speed benchmark (`python -m tuner bench`).
# Usage: bench/gpu_check.sh [OUT_DIR]     (default: gpu-check-<UTC time>)
# Env:   PYTHON (default: python), BENCH_ARGS (extra flags for the benchmark, e.g. "--repeats 1").
# Every step writes its log under OUT_DIR; the script goes on after a failed step and exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
PY=${PYTHON:-python}
mkdir -p "$OUT"
failed=()

if ! GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); then
    echo "no NVIDIA GPU here (nvidia-smi -L found none): nothing to check" | tee "$OUT/summary.txt"
    exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
echo "$GPUS GPU(s); logs in $OUT"

step() {  # step NAME COMMAND...: run it, log to OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    if "$@" > "$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; failed+=("$name"); fi
}

# 1. the GPU tests
step gpu-tests "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests/

# 2. DDP on every GPU (one process per GPU; a single GPU runs one process)
step convert "$PY" -m tuner convert datasets/kettle_transcripts.txt --out "$OUT/data" --json
if [ "$GPUS" -gt 1 ]; then
    launch=("$PY" -m accelerate.commands.launch --config_file docs/accelerate/ddp.yaml --num_processes "$GPUS")
else
    launch=("$PY" -m accelerate.commands.launch --num_processes 1 --mixed_precision bf16)
fi
step ddp-train "${launch[@]}" -m tuner train --data "$OUT/data" --preset quick --out "$OUT/ddp-run" --json
"$PY" - "$OUT/ddp-run" > "$OUT/ddp-summary.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from tuner import memory
from tuner.config import TrainConfig
run = Path(sys.argv[1])
status = json.loads((run / "status.json").read_text())
cfg = TrainConfig.load(run / "config.yaml")
need = memory.plan(memory.shape_of(cfg.base_model), cfg)
print(f"status {status.get('status')}: {status.get('processes')} process(es), effective batch "
      f"{status.get('effective_batch')}, {status.get('step')} steps, {status.get('wall_s')} s")
peak = status.get("peak_memory_mb")
print(f"peak memory of rank 0: {peak} MiB measured (torch.cuda.max_memory_allocated); "
      f"formula: {need['total_gib'] * 1024:.0f} MiB ({memory.describe(need)}; parts {need['parts_gib']})")
EOF
cat "$OUT/ddp-summary.txt"

# 3. the speed benchmark
step bench "$PY" -m tuner bench --out "$OUT/bench.json" ${BENCH_ARGS:-}

{
    echo "gpu_check $(date -u +%FT%TZ): $GPUS GPU(s)"
    cat "$OUT/ddp-summary.txt"
    if [ ${#failed[@]} -eq 0 ]; then echo "all steps passed"; else echo "failed: ${failed[*]}"; fi
} | tee "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
