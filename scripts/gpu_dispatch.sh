#!/usr/bin/env bash
# flashinfer_onesided on a GPU host: install, JIT warm-up, CPU suite, GPU suite and dispatch benchmark on N GPUs.
#
#   bash scripts/gpu_dispatch.sh N          (N >= 2 GPUs of one host, EP = N; from the repository root)
#
# On the lent GPU machines: build the wheelhouse first on the CPU machine
#   (cd /work/main && python3 ../shared/gpu/wheelhouse.py --peer)       -> .whl/ (flashinfer, tvm-ffi, JIT cache)
# then run with .whl carried, e.g. run(command="bash scripts/gpu_dispatch.sh 2", carry=[".whl"],
# kind="nvidia-h100-x2") and likewise N=4 on nvidia-h100-x4. Expected wall time 3-5 minutes with the
# prebuilt JIT module (add ~3 minutes if FlashInfer has to compile it); a global budget (BUDGET_S, default
# 540 s) keeps the whole run under the 10-minute command limit.
#
# GPU_DISPATCH_STEPS="setup warmup bench" runs only the named steps; BENCH_EXTRA_ARGS (e.g. "--profile 200")
# is appended to the main benchmark's arguments.
#
# Steps (each logged; a failing step does not stop the others; exit status = number of failed steps):
#   setup       install .whl into /tmp/site exactly as ../shared/gpu/wheelhouse.py says, the prebuilt JIT
#               cache into ~/.cache, hostcore + sentinel + this plugin editable (fallback: entry-point metadata)
#   host-facts  GPUs, NVLink topology, imports, the plugin's availability(), `hostcore plugins`
#   warmup      FlashInfer's all-to-all module through the plugin's warm_up() (visible progress)
#   cpu         the plugin's CPU suite (fake FlashInfer) and the fake-vs-real FlashInfer API check
#   gpu         the GPU suite under torchrun --nproc-per-node N
#   bench       bench/dispatch/bench_dispatch.py under torchrun, then the plot
# $OUT receives at most 8 files: summary-epN.txt, setup-epN.log, gpu-tests-epN.log, gpu-tests-epN.json,
# bench-epN.log, dispatch-<gpu>-epN.json, dispatch-<gpu>-epN.png. The summary table is printed last.
#
# NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1
# (exported here and set again inside every Python entry point).
#
# GPU_DISPATCH_DRY_RUN=1 runs the same orchestration on a CPU machine (no install; the fake FlashInfer; CPU
# ranks over gloo; a few bench iterations) to check this script before GPU time is spent.
set -u -o pipefail

N="${1:-}"
if ! [[ "$N" =~ ^[0-9]+$ ]] || (( N < 2 )); then
    echo "usage: bash scripts/gpu_dispatch.sh N   (N >= 2: GPUs = EP ranks); got '${N}'" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
DRY="${GPU_DISPATCH_DRY_RUN:-0}"
OUT="${OUT:-/tmp/gpu_dispatch_out}"
mkdir -p "$OUT"
WORK=/tmp/gpu_dispatch_work
rm -rf "$WORK" && mkdir -p "$WORK"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# /tmp/site first (the prebuilt JIT module expects FlashInfer there); the repo paths make hostcore and the
# plugins importable even if the editable install fails (their entry points then come from the fallback).
export PYTHONPATH="/tmp/site:$PWD:$PWD/moe_plugins/sentinel:$PWD/moe_plugins/flashinfer_onesided:$PWD/moe_plugins/cupy_preprocess:$PWD/moe_plugins/marlin${PYTHONPATH:+:$PYTHONPATH}"
BENCH_ARGS=()
if [[ "$DRY" == 1 ]]; then
    export PYTHONPATH="$PWD/moe_plugins/flashinfer_onesided/tests/fake_site:$PYTHONPATH" FI_GPU_DRY_RUN=1
    export FAKE_FLASHINFER_JIT_DIR="$WORK/fake_jit"
    BENCH_ARGS=(--dry-run --iters 5 --warmup 2 --tokens 1,8,64)
fi

BUDGET_S="${BUDGET_S:-540}"
START=$(date +%s)
STEPS=() STATUS=() TAKEN=() NOTES=()
FAILED=0

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS LOG CMD...: run CMD with a timeout (capped by the remaining budget), append to LOG.
step() {
    local name=$1 max=$2 log=$3; shift 3
    local left limit t0 rc note=""
    if [[ -n "${GPU_DISPATCH_STEPS:-}" && " $GPU_DISPATCH_STEPS " != *" $name "* ]]; then return 0; fi
    left=$(remaining)
    limit=$(( max < left - 10 ? max : left - 10 ))
    t0=$(date +%s)
    if (( limit < 15 )); then
        rc=124; note="skipped: out of time budget"
        echo "=== $name: $note" >>"$log"
    else
        echo "=== $name (limit ${limit}s): $*" >>"$log"
        timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$log" 2>&1
        rc=$?
        if (( rc == 124 || rc == 137 )); then note="timed out after ${limit}s"; fi
    fi
    STEPS+=("$name"); TAKEN+=("$(( $(date +%s) - t0 ))"); NOTES+=("$note")
    if (( rc == 0 )); then STATUS+=("ok"); else STATUS+=("FAILED rc=$rc"); FAILED=$((FAILED + 1)); fi
    echo "[gpu_dispatch] $name: rc=$rc ($(( $(date +%s) - t0 )) s) ${note}"
    return 0
}

SETUP_LOG="$OUT/setup-ep$N.log"
: >"$SETUP_LOG"

# -- setup -------------------------------------------------------------------------------------------------
install() {
    set -e
    ls -la .whl/
    if [[ -d /tmp/site/flashinfer ]]; then
        echo "flashinfer already in /tmp/site (an earlier step on this machine): not reinstalled"
    else
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
        # pip stamps the files it writes with the install time, which makes them newer than the prebuilt
        # JIT module, and ninja would then rebuild it (2-3 minutes): date them back before the module.
        find /tmp/site -exec touch -h -d '2020-01-01 00:00:00' {} +
        mkdir -p ~/.cache && tar xzf .whl/flashinfer-jit-cache-*.tgz -C ~/.cache
    fi
    local pkgs=(-e .) p
    for p in moe_plugins/sentinel moe_plugins/flashinfer_onesided moe_plugins/cupy_preprocess moe_plugins/marlin; do if [[ -d $p ]]; then pkgs+=(-e "$p"); fi; done
    if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation "${pkgs[@]}"; then
        echo "pip editable install failed: writing entry-point metadata into /tmp/site instead (code from PYTHONPATH)"
        python3 bench/dispatch/entry_point_fallback.py /tmp/site . moe_plugins/sentinel moe_plugins/flashinfer_onesided \
            moe_plugins/cupy_preprocess moe_plugins/marlin
    fi
}
host_facts() {
    nvidia-smi -L || true
    nvidia-smi topo -m || true
    python3 bench/dispatch/host_facts.py
    python3 -m hostcore.cli.main plugins || true
    if command -v ninja >/dev/null; then echo "ninja: $(command -v ninja)"; else
        echo "ninja: NOT FOUND (FlashInfer's JIT check needs it)"; fi
}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if (( GPUS < N )) && [[ "$DRY" != 1 ]]; then
    echo "[gpu_dispatch] this host has ${GPUS} GPUs, fewer than N=${N}" | tee -a "$SETUP_LOG" >&2
fi
if [[ "$DRY" == 1 ]]; then
    echo "dry run: no install" >>"$SETUP_LOG"
else
    step setup 150 "$SETUP_LOG" bash -c "$(declare -f install); install"
fi
step host-facts 60 "$SETUP_LOG" bash -c "$(declare -f host_facts); host_facts"

# -- warm-up -----------------------------------------------------------------------------------------------
step warmup 240 "$SETUP_LOG" python3 -c "
from moe_plugin_flashinfer_onesided import warm_up
print(warm_up())"

# -- CPU suite + fake fidelity -----------------------------------------------------------------------------
step cpu 150 "$SETUP_LOG" python3 -m pytest moe_plugins/flashinfer_onesided -q -p no:cacheprovider -m "not gpu"

# -- GPU suite ---------------------------------------------------------------------------------------------
GPU_LOG="$OUT/gpu-tests-ep$N.log"
: >"$GPU_LOG"
export FI_GPU_RESULTS="$WORK/gpu"
step gpu 300 "$GPU_LOG" python3 -m torch.distributed.run --standalone --nproc-per-node "$N" -m pytest \
    moe_plugins/flashinfer_onesided/tests/gpu -q -p no:cacheprovider
python3 bench/dispatch/summarize.py merge-gpu "$WORK/gpu" "$OUT/gpu-tests-ep$N.json" || true

# -- benchmark ---------------------------------------------------------------------------------------------
BENCH_LOG="$OUT/bench-ep$N.log"
: >"$BENCH_LOG"
step bench 300 "$BENCH_LOG" python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
    bench/dispatch/bench_dispatch.py --out "$WORK/bench" "${BENCH_ARGS[@]}" ${BENCH_EXTRA_ARGS:-}
# torch_a2a captured in CUDA graphs too, on fewer sizes (a separate run: a failed capture of NCCL work must
# not cost the main table).
step bench-graph-peer 150 "$BENCH_LOG" python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
    bench/dispatch/bench_dispatch.py --out "$WORK/bench-graph-peer" --graph-peer --no-extras \
    --tokens 1,64,1024 "${BENCH_ARGS[@]}"
step plot 60 "$BENCH_LOG" bash -c "python3 bench/dispatch/plot_dispatch.py $WORK/bench/*.json"
for f in "$WORK"/bench-graph-peer/*.json; do [[ -f $f ]] && cp "$f" "${f%.json}-graph-peer.json"; done
mkdir -p "$WORK/bench-extra" && mv "$WORK"/bench-graph-peer/*-graph-peer.json "$WORK/bench-extra/" 2>/dev/null
cp "$WORK"/bench/*.json "$WORK"/bench/*.png "$WORK"/bench-extra/*.json "$OUT"/ 2>/dev/null || true

# -- summary (printed last) --------------------------------------------------------------------------------
SUMMARY="$OUT/summary-ep$N.txt"
{
    echo "=== gpu_dispatch.sh N=$N$([[ $DRY == 1 ]] && echo ' DRY RUN (CPU, fake FlashInfer)') on" \
         "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) ($(( $(date +%s) - START )) s)"
    grep -E "^imports|^flashinfer_onesided availability|^ninja" "$SETUP_LOG" || true
    grep -E "^\[flashinfer_onesided\] (found|not built|ready)" "$SETUP_LOG" || true
    printf '%-11s %-16s %7s  %s\n' step status seconds note
    for i in "${!STEPS[@]}"; do
        printf '%-11s %-16s %7s  %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${TAKEN[$i]}" "${NOTES[$i]}"
    done
    python3 bench/dispatch/summarize.py gpu "$OUT/gpu-tests-ep$N.json" || true
    python3 bench/dispatch/summarize.py bench "$WORK/bench" || true
    echo "failed steps: $FAILED; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
} >"$SUMMARY" 2>&1
cat "$SUMMARY"
exit $(( FAILED > 255 ? 255 : FAILED ))
