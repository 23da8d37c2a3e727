#!/usr/bin/env bash
# The whole GPU verification of the project in two calls of the device tool, one per machine kind.
#
#   bash scripts/gpu_check.sh single        one GPU  (kind nvidia-h100-x1, carry [".peer"] for the Marlin peer)
#       the CuPy preprocess suite + sanitizers + benchmark, then the Marlin suite + sanitizer + benchmark
#   bash scripts/gpu_check.sh multi N...    N GPUs   (kind nvidia-h100-x2 / -x4, carry [".whl"])
#       for each N (e.g. `multi 4 2`): the FlashInfer dispatch suite + benchmark at EP N, then the full
#       pipeline under torchrun
#
# Each part runs its own script (scripts/gpu_preprocess.sh, gpu_marlin.sh, gpu_dispatch.sh, gpu_pipeline.sh)
# with its own output folder; everything is packed into $OUT/gpu-check-<part>.tgz (the device tool returns at
# most 8 files) and the parts' summaries are printed last. Copy results into bench/results/ and the plugins'
# GPU_RESULTS.md after the run. Exit status: the number of parts that failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PART="${1:?usage: bash scripts/gpu_check.sh single | multi N}"
OUT="${OUT:-$PWD/out}"
WORK=/tmp/gpu_check
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
FAILED=0
part() {  # NAME CMD...: run one part with its own OUT folder, keep the last lines of its output
    local name=$1; shift
    mkdir -p "$WORK/$name"
    echo "=== $name: $*"
    OUT="$WORK/$name" "$@" >"$WORK/$name/console.log" 2>&1
    local rc=$?
    (( rc == 0 )) || FAILED=$((FAILED + 1))
    { echo "--- $name (rc=$rc)"; tail -25 "$WORK/$name/console.log"; } >>"$WORK/summary.txt"
}
case "$PART" in
single)
    part preprocess bash scripts/gpu_preprocess.sh all
    part marlin bash scripts/gpu_marlin.sh setup test sanitize bench ;;
multi)
    # Several EP sizes on one host in one call, largest first (N=2 on a 4-GPU host takes GPUs 0 and 1).
    # Each part gets the time left before DEADLINE_S (default 570 s after the start), so the call ends
    # inside the device tool's 10-minute limit with whatever finished.
    shift
    (( $# > 0 )) || { echo "usage: bash scripts/gpu_check.sh multi N [N...]" >&2; exit 2; }
    END=$(( $(date +%s) + ${DEADLINE_S:-570} ))
    left() { echo $(( END - $(date +%s) )); }
    for N in "$@"; do part "dispatch-ep$N" env BUDGET_S="$(( $(left) * 2 / 3 ))" bash scripts/gpu_dispatch.sh "$N"
        part "pipeline-ep$N" env PIPELINE_DEADLINE="$(( END - 15 ))" bash scripts/gpu_pipeline.sh "$N"; done ;;
*)
    echo "unknown part '$PART': expected single or multi N" >&2; exit 2 ;;
esac
tar czf "$OUT/gpu-check-$PART.tgz" -C "$WORK" .
cat "$WORK/summary.txt"
echo "gpu_check.sh $PART: $FAILED part(s) failed; everything in $OUT/gpu-check-$PART.tgz"
exit "$FAILED"
