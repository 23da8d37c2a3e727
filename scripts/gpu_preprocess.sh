#!/usr/bin/env bash
# GPU run of the cupy preprocess plugin: install, GPU tests, benchmark, compute-sanitizer.
# Usage (on the GPU host, repository root): scripts/gpu_preprocess.sh [all|tests|bench|sanitize|profile|trace]...
# (`profile` and `trace`, not part of `all`: Nsight Compute's full section set on each kernel at a few sizes,
# ncu.txt; per-phase timestamps inside the kernels, trace.log / trace.jsonl.)
# Logs and the benchmark JSON go to $OUT (default ./out); the last lines printed are a summary table.
set -u -o pipefail
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$PWD/.cupy_cache}"  # compiled once here, reused by every step
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
STEPS="${*:-all}"
want() { [[ " $STEPS " == *" all "* || " $STEPS " == *" $1 "* ]]; }
declare -A STATUS

# The multi-block path is one cooperative launch of grid_fused (csrc/preprocess.cu); the sanitizer workload
# (tests/sanitize_run.py) refuses to pass unless it ran grid_fused (one and two barriers) and every other kernel.
# At most 8 files come back from $OUT: env.txt, pytest-gpu.log, bench.log, preprocess-<gpu>.json, sanitizer.log,
# trace.log, trace.jsonl (and one more for the caller).
ENV="$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$ENV"
# The benchmark JSON is named after the card (preprocess-h100.json, preprocess-h200.json): lent hosts vary.
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h[0-9]+' | head -1 | tr 'A-Z' 'a-z')
BENCH_JSON="$OUT/preprocess-${GPU_TAG:-gpu}.json"
python3 -m pip install -q --no-deps --no-build-isolation -e . -e moe_plugins/cupy_preprocess 2>&1 | grep -v WARNING
python3 -c "from hostcore import get_registry, Stage; r = get_registry(); print('preprocess backends:', \
r.names(Stage.PREPROCESS), 'failures:', r.failures); from moe_plugin_cupy_preprocess import availability_reason; \
print('cupy available:', availability_reason() or 'yes')" 2>&1 | tee -a "$ENV"

if want tests; then
  timeout 300 python3 -m pytest moe_plugins/cupy_preprocess -m gpu -q -rs --durations=12 -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest-gpu.log"
  STATUS[tests]=$(tail -1 "$OUT/pytest-gpu.log")
fi

if want bench; then
  timeout 200 python3 bench/preprocess/bench_preprocess.py --out "$BENCH_JSON" 2>&1 | tee "$OUT/bench.log"
  STATUS[bench]="rc=$?"
fi

if [[ " $STEPS " == *" profile "* ]]; then
  PROFILE_SIZES="${PROFILE_SIZES:-8 512 2048 16384 1048576 8388608}"
  timeout 240 ncu --clock-control none --set full -k 'regex:preprocess|grid_' --launch-skip 0 \
    python3 bench/preprocess/profile_preprocess.py --sizes $PROFILE_SIZES --calls 1 > "$OUT/ncu.txt" 2>&1
  STATUS[profile]="rc=$? $(grep -c 'Duration' "$OUT/ncu.txt") kernels profiled"
fi

if [[ " $STEPS " == *" trace "* ]]; then
  # Per-phase timestamps inside the kernels (HC_TRACE build): the auto path, the block path at 8K-16K, and
  # the block path held to one block (--block-owned) next to its several-block plan.
  TRACE_SIZES="${TRACE_SIZES:-8 64 512 2048 4096 8192 16384 65536 1048576 8388608}"
  { timeout 150 python3 bench/preprocess/phase_trace.py --per-block --sizes $TRACE_SIZES --out "$OUT/trace.jsonl"
    timeout 60 python3 bench/preprocess/phase_trace.py --path block --sizes 8192 16384 --out "$OUT/trace.jsonl"
    timeout 60 python3 bench/preprocess/phase_trace.py --path block --block-owned 1000000 --sizes 512 2048 4096 8192 \
      --out "$OUT/trace.jsonl"
  } > "$OUT/trace.log" 2>&1
  STATUS[trace]="rc=$? $(grep -c event "$OUT/trace.log") traces"
fi

if want sanitize; then
  # Kernels are in the disk cache by now; the three tools run side by side (they are CPU-bound).
  SAN="moe_plugins/cupy_preprocess/tests/sanitize_run.py"
  python3 "$SAN" 2>&1 | tee -a "$ENV"  # warms the kernel cache if the tests did not run
  for tool in memcheck racecheck initcheck; do
    extra=""
    [[ $tool == memcheck ]] && extra="--leak-check no"
    ( timeout 150 compute-sanitizer --tool $tool $extra --error-exitcode 9 python3 "$SAN" > "$OUT/sanitizer-$tool.log" 2>&1
      echo "rc=$?" >> "$OUT/sanitizer-$tool.log" ) &
  done
  wait
  for tool in memcheck racecheck initcheck; do
    STATUS[$tool]="$(grep -h -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer-$tool.log" | tail -1) $(grep -h -E '^sanitize workload|MISMATCH' "$OUT/sanitizer-$tool.log" | tail -1 | cut -c1-40) $(tail -1 "$OUT/sanitizer-$tool.log")"
    { echo "==================== compute-sanitizer --tool $tool"; cat "$OUT/sanitizer-$tool.log"; } >> "$OUT/sanitizer.log"
    rm "$OUT/sanitizer-$tool.log"  # one file for the three: at most 8 files come back from $OUT
  done
fi

echo
echo "==================== summary ($(head -2 "$ENV" | tail -1)) ===================="
for k in tests bench profile trace memcheck racecheck initcheck; do
  [[ -n "${STATUS[$k]:-}" ]] && printf '%-10s %s\n' "$k" "${STATUS[$k]}"
done
if [[ -f "$BENCH_JSON" ]]; then
  python3 - "$BENCH_JSON" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"copy {d['copy_gbps']:.0f} GB/s   empty launch {d['launch_us']:.2f} us (hot {d.get('launch_hot_us', 0):.2f}, graph {d['launch_graph_us'] or 0:.2f}, "
      f"wall {d['launch_wall_us']:.2f})")
print(f"{'N*K':>9} {'path':>5} {'ours us':>9} {'hot us':>8} {'floor us':>8} {'torch us':>10} {'x':>7} {'GB/s':>7} {'%copy':>6} {'%same':>6} "
      f"{'graph us':>9} {'wall us':>8} {'blocks':>6}")
for r in d["rows"]:
    kind = "fused" if r.get("kernels") == ["grid_fused"] else r["path"]
    print(f"{r['num_slots']:>9} {kind:>5} {r['ours_us']:9.2f} {r.get('ours_hot_us', 0):8.2f} {r.get('copy_floor_us', 0):8.2f} {r['peer_us']:10.2f} {r['speedup']:7.1f} "
          f"{r['gbps']:7.1f} {r['roofline_frac']:6.1%} {r.get('copy_same_bytes_frac', 0):6.1%} {r['ours_graph_us'] or 0:9.2f} "
          f"{r['ours_wall_us']:8.1f} {r.get('grid_blocks', 0):>6}")
for n, k in d.get("kernel_breakdown_us", {}).items():
    print(f"kernels N*K={n}: " + ", ".join(f"{a} {b:.2f} us" for a, b in k.items()))
for c in d["path_compare"]:
    names = [k[:-3] for k in c if k.endswith("_us") and not k.endswith("_graph_us")]
    print(f"path compare N*K={c['num_slots']}: " + ", ".join(f"{p} {c[p + '_us']:.2f} us (graph {c[p + '_graph_us'] or 0:.2f})"
                                                            for p in names))
print("goals:", d["goals"])
EOF
fi
