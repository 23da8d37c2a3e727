#!/usr/bin/env bash
# GPU checks and benchmark of the marlin experts backend, in one script for one lent-GPU call.
#
#   scripts/gpu_marlin.sh [setup] [test] [quicktest] [sanitize] [ncu] [stagecmp] [diag] [bench] [benchquick]
#
# The full check (the default phases): `setup test sanitize bench` = install + compile, every GPU test (the full
# float64 sweep, every tile config), memcheck + racecheck, then the official benchmark (ours vs the vLLM peer vs
# bf16 torch, each case checked against a float32 reference before and after timing). The peer is
# .peer/_moe_C_stable_libtorch.abi3.so (an ignored path: carry it); BENCH_ARGS="--peer ''" benchmarks without it.
#
# Writes logs under $OUT (default ./out): log.txt (everything), pytest.log, sweep.jsonl, GPU_RESULTS.md,
# sanitizer.log, marlin-h100.json, marlin-h100.png. Prints a short summary table last (with each phase's seconds).
# Env: BENCH_ARGS (extra args for bench/marlin/bench_marlin.py), MARLIN_SWEEP_MS (M values of the sweep).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_CACHE_MAXSIZE=4294967296
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
summary=()
phase() { echo; echo "=== $1 ($(date +%T)) ==="; t_phase=$SECONDS; }
record() { summary+=("$(printf '%-10s %-6s %4ss  %s' "$1" "$2" "$((SECONDS - t_phase))" "$3")"); }

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(setup test sanitize bench)

for p in "${PHASES[@]}"; do
  case "$p" in
  setup)
    phase setup
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -m pip install -q --no-deps --no-build-isolation -e . -e moe_plugins/marlin 2>&1 | grep -v "WARNING: Running pip" || true
    python3 - <<'PY'
import time, torch
from hostcore import Stage
from hostcore.registry import get_registry
reg = get_registry()
print("experts backends:", reg.names(Stage.EXPERTS), "failures:", reg.failures)
b = reg.get(Stage.EXPERTS, "marlin")
print("marlin availability:", b.availability())
import cupy; print("cupy", cupy.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))
from moe_plugin_marlin import jit
t = time.perf_counter(); jit.kernel_set(0, True, 128); print(f"compile bf16/g128: {time.perf_counter()-t:.1f} s")
t = time.perf_counter(); jit.kernel_set(0, True, None); print(f"compile bf16/per-channel: {time.perf_counter()-t:.1f} s")
import os
if os.path.exists(".peer/_moe_C_stable_libtorch.abi3.so"):
    torch.ops.load_library(".peer/_moe_C_stable_libtorch.abi3.so")
    for op in ("moe_wna16_marlin_gemm", "moe_align_block_size", "moe_sum"):
        print("peer", op, getattr(torch.ops._moe_C, op).default._schema)
ks = jit.kernel_set(0, True, 128)
for (cfg, g2), fn in ks.gemm.items():
    a = fn.attributes
    print(f"  {cfg} gemm2={g2}: regs={a['num_regs']} local={a['local_size_bytes']} smem_dyn={ks.smem[cfg]}")
PY
    rc=$?; record setup "$([ $rc = 0 ] && echo ok || echo FAIL)" "install, registry, compile"
    ;;
  test|quicktest)
    phase "$p"
    rm -f "$OUT/sweep.jsonl"
    if [ "$p" = quicktest ]; then export MARLIN_SWEEP_MS=${MARLIN_SWEEP_MS:-1,16,256}; fi
    MARLIN_RESULTS_JSONL="$OUT/sweep.jsonl" timeout 420 python3 -m pytest moe_plugins/marlin -m gpu -q -x \
      -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/pytest.log" | tail -40
    rc=${PIPESTATUS[0]}
    [ -f "$OUT/sweep.jsonl" ] && python3 bench/marlin/results_md.py "$OUT/sweep.jsonl" "$OUT/GPU_RESULTS.md" \
      "# marlin GPU results ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F))"
    record "$p" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$(tail -1 "$OUT/pytest.log")"
    ;;
  sanitize)
    phase sanitize
    timeout 240 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 \
      python3 bench/marlin/sanitize_case.py > "$OUT/sanitizer.log" 2>&1
    rc=$?; tail -8 "$OUT/sanitizer.log"
    record memcheck "$([ $rc = 0 ] && echo ok || echo "FAIL($rc)")" "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
    t_phase=$SECONDS
    timeout 200 compute-sanitizer --tool racecheck --error-exitcode 9 \
      python3 bench/marlin/sanitize_case.py >> "$OUT/sanitizer.log" 2>&1
    rc=$?; tail -4 "$OUT/sanitizer.log"
    record racecheck "$([ $rc = 0 ] && echo ok || echo "FAIL($rc)")" "$(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
    ;;
  bench|benchquick)
    phase "$p"
    args=${BENCH_ARGS:-}
    [ "$p" = benchquick ] && args="--no-first-call --peer '' $args"
    eval timeout 560 python3 bench/marlin/bench_marlin.py --out "$OUT/marlin-h100.json" --png "$OUT/marlin-h100.png" $args
    rc=$?; record "$p" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$OUT/marlin-h100.json"
    ;;
  ncu)
    phase ncu
    timeout 300 ncu --kernel-name regex:moe_marlin_gemm --launch-count 8 --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis python3 bench/marlin/ncu_case.py > "$OUT/ncu.txt" 2>&1
    rc=$?
    grep -E "moe_marlin_gemm|^(qwen|mixtral)|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Stall|One or More" "$OUT/ncu.txt" | head -120
    record ncu "$([ $rc = 0 ] && echo ok || echo "FAIL($rc)")" "$OUT/ncu.txt"
    ;;
  stagecmp)
    phase "stagecmp (MOE_MARLIN_STAGES=${CMP_STAGES:-4})"
    MOE_MARLIN_STAGES=${CMP_STAGES:-4} timeout 200 python3 bench/marlin/bench_marlin.py --no-first-call --peer '' \
      --ms ${CMP_MS:-1,16,64} --out "$OUT/stages${CMP_STAGES:-4}.json" | tail -8
    rc=$?; record stagecmp "$([ $rc = 0 ] && echo ok || echo FAIL)" "$OUT/stages${CMP_STAGES:-4}.json"
    ;;
  diag)
    phase diag
    for minb in 3 2; do
      for st in "" 6; do
        echo "--- MARLIN_M1_MINB=$minb MOE_MARLIN_STAGES=${st:-auto}"
        MOE_MARLIN_NVRTC_OPTIONS="-DMARLIN_M1_MINB=$minb" MOE_MARLIN_STAGES=$st timeout 240 \
          python3 bench/marlin/diag_configs.py 2>&1 | tee -a "$OUT/diag.txt"
      done
    done
    MOE_MARLIN_NVRTC_OPTIONS="-lineinfo" timeout 120 compute-sanitizer --tool memcheck --show-backtrace device \
      python3 bench/marlin/diag_configs.py 16 gemm1 2 > "$OUT/diag_sanitizer.txt" 2>&1
    grep -E "Illegal|Invalid|at .*marlin_moe.cu|ERROR SUMMARY|err" "$OUT/diag_sanitizer.txt" | head -20
    record diag done "$OUT/diag.txt"
    ;;
  *) echo "unknown phase $p (setup test quicktest sanitize ncu stagecmp diag bench benchquick)"; exit 2;;
  esac
done

echo; echo "=== summary ==="
printf '%s\n' "${summary[@]}"
