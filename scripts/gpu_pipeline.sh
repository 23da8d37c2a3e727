#!/usr/bin/env bash
# The full GPU pipeline under torchrun: dispatch=flashinfer_onesided, preprocess=cupy, experts=marlin.
#
#   bash scripts/gpu_pipeline.sh N     (after scripts/gpu_dispatch.sh N has installed .whl into /tmp/site)
#
# `hostcore run` on N GPUs (one rank each, NCCL), real shapes with synthetic int4 weights, uneven tokens
# per rank with the last rank at 0, each rank checked against a float64 dense reference of its tokens:
#   fixed      the valid sentinels (non_local, guard_slot, auto) with the safe CuPy preprocess
#   seed bug   sentinel=negative with preprocess=cupy(mode=faithful): padding misrouted as in vLLM #42034
#   counted    sentinel=negative with preprocess=cupy(mode=safe): the bad ids are skipped and counted
#   reference  the same shapes through torch_a2a over NCCL (the host reference dispatch)
#   prefill    256 tokens on rank 0: the preprocess's cluster kernel (8 or 16 blocks), valid sentinels and
#              counted -1
# PIPELINE_DEADLINE (epoch seconds) skips the cases that would start too late (counted as failed).
# Logs and JSON go to $OUT/pipeline-epN.tgz (one file: the device tool returns at most 8); a table is printed.
set -u -o pipefail
N="${1:?usage: bash scripts/gpu_pipeline.sh N}"
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_pipeline_out}"
mkdir -p "$OUT"
WORK=/tmp/gpu_pipeline_work
rm -rf "$WORK" && mkdir -p "$WORK"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e moe_plugins/cupy_preprocess \
    -e moe_plugins/marlin >"$WORK/install.log" 2>&1 || echo "install of cupy_preprocess/marlin failed (see log)"
python3 -m hostcore.cli.main plugins | tee "$WORK/plugins.txt"

FAILED=0
run_case() {  # NAME SHAPE TOKENS BACKENDS SENTINELS
    local name=$1 shape=$2 tokens=$3 backends=$4 sentinels=$5
    local limit=$(( ${PIPELINE_DEADLINE:-$(( $(date +%s) + 240 ))} - $(date +%s) ))
    (( limit > 240 )) && limit=240
    if (( limit < 30 )); then
        echo "=== $name: SKIPPED (out of time: PIPELINE_DEADLINE)"; FAILED=$((FAILED + 1)); return
    fi
    echo "=== $name: shape=$shape tokens=$tokens backends=$backends sentinels=$sentinels"
    timeout "$limit" python3 -m torch.distributed.run --standalone --nproc-per-node "$N" -m hostcore.cli.main run \
        --shape "$shape" --tokens "$tokens" --backends "$backends" --sentinels "$sentinels" \
        --json "$WORK/$name.json" >"$WORK/$name.log" 2>&1
    local rc=$?
    sed -n '/^summary/,$p' "$WORK/$name.log"
    if (( rc != 0 )); then FAILED=$((FAILED + 1)); echo "[$name] rc=$rc"; tail -25 "$WORK/$name.log"; fi
}
GPU="dispatch=flashinfer_onesided,experts=marlin"
run_case fixed-qwen3 qwen3-30b-a3b 48 "$GPU,preprocess=cupy" non_local,guard_slot,auto
run_case fixed-mixtral mixtral-8x7b 16 "$GPU,preprocess=cupy" auto
run_case seedbug-qwen3 qwen3-30b-a3b 48 "$GPU,preprocess=cupy(mode=faithful)" negative
run_case counted-qwen3 qwen3-30b-a3b 48 "$GPU,preprocess=cupy(mode=safe)" negative
run_case torch-a2a-qwen3 qwen3-30b-a3b 48 "dispatch=torch_a2a,experts=marlin,preprocess=cupy" auto
# A prefill-sized batch: N x 256 x 8 received slots per rank (4096 at EP 2, 8192 at EP 4) take the cupy
# preprocess's thread-block cluster kernel on Hopper (more than 1024 slots, at most 64 local experts): 8 blocks
# at EP 2, 16 at EP 4 where the GPU holds such clusters.
run_case prefill-qwen3 qwen3-30b-a3b 256 "$GPU,preprocess=cupy" non_local,auto
run_case prefill-counted-qwen3 qwen3-30b-a3b 256 "$GPU,preprocess=cupy(mode=safe)" negative
tar czf "$OUT/pipeline-ep$N.tgz" -C "$WORK" .
echo "gpu_pipeline.sh N=$N: $FAILED failed case(s); logs in pipeline-ep$N.tgz"
exit "$FAILED"
