// Entry points of the CPU emulation (see hc_emulate.h). Each takes the launch shape and the kernel's
// arguments packed as 64-bit words, in the order of the kernel's parameter list (as launch.py passes them).
#include "hc_emulate.h"

#include "preprocess_emu.inc"  // csrc/preprocess.cu with its shared-memory declarations rewritten

namespace {
template <typename T>
T* P(const int64_t* a, int i) { return reinterpret_cast<T*>(static_cast<uintptr_t>(a[i])); }
int I(const int64_t* a, int i) { return static_cast<int>(a[i]); }

template <typename IdT, int IPT, int SUB>
void run_block(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch(grid, block, smem, [a] {
        block_preprocess<IdT, IPT, SUB>(P<const IdT>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), I(a, 4), I(a, 5),
                                        I(a, 6), I(a, 7), P<int>(a, 8), P<int>(a, 9), P<int>(a, 10), P<int>(a, 11),
                                        P<int>(a, 12), P<int>(a, 13), I(a, 14), I(a, 15), I(a, 16), I(a, 17), I(a, 18));
    });
}

template <typename IdT, int SPL>
void run_warp(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch(grid, block, smem, [a] {
        warp_preprocess<IdT, SPL>(P<const IdT>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), I(a, 4), I(a, 5), I(a, 6),
                                  I(a, 7), P<int>(a, 8), P<int>(a, 9), P<int>(a, 10), P<int>(a, 11), P<int>(a, 12),
                                  P<int>(a, 13), I(a, 14), I(a, 15));
    });
}

template <typename IdT, int SPL, int EPL>
void run_lane(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch(grid, block, smem, [a] {
        lane_preprocess<IdT, SPL, EPL>(P<const IdT>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), I(a, 4), I(a, 5), I(a, 6),
                                  I(a, 7), P<int>(a, 8), P<int>(a, 9), P<int>(a, 10), P<int>(a, 11), P<int>(a, 12),
                                  P<int>(a, 13), I(a, 14), I(a, 15));
    });
}

template <typename IdT, int IPT, int EPL>
void run_block_lane(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch(grid, block, smem, [a] {
        block_lane_preprocess<IdT, IPT, EPL>(P<const IdT>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), I(a, 4), I(a, 5),
                                        I(a, 6), I(a, 7), P<int>(a, 8), P<int>(a, 9), P<int>(a, 10), P<int>(a, 11),
                                        P<int>(a, 12), P<int>(a, 13), I(a, 14), I(a, 15), I(a, 16));
    });
}

template <typename IdT, int IPT, int EPL, int CB>
void run_cluster_lane(unsigned block, size_t smem, const int64_t* a) {
    hc_launch_cluster(CB, block, smem, [a] {
        cluster_lane_preprocess<IdT, IPT, EPL, CB>(P<const IdT>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), I(a, 4), I(a, 5),
                                               I(a, 6), I(a, 7), P<int>(a, 8), P<int>(a, 9), P<int>(a, 10), P<int>(a, 11),
                                               P<int>(a, 12), P<int>(a, 13), I(a, 14), I(a, 15));
    });
}

template <typename IdT>
void run_count(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch(grid, block, smem, [a] {
        grid_count<IdT>(P<const IdT>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), I(a, 4), I(a, 5), I(a, 6), I(a, 7),
                        P<int>(a, 8), I(a, 9), P<int>(a, 10), P<int>(a, 11), P<unsigned char>(a, 12), I(a, 13),
                        I(a, 14), I(a, 15), I(a, 16));
    });
}

template <typename IdT, typename StageT>
void run_fused(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch_cooperative(grid, block, smem, [a] {
        grid_fused<IdT, StageT>(P<const IdT>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), I(a, 4), I(a, 5), I(a, 6),
                                I(a, 7), P<int>(a, 8), P<int>(a, 9), P<int>(a, 10), P<int>(a, 11), P<int>(a, 12),
                                P<int>(a, 13), I(a, 14), I(a, 15), P<int>(a, 16), P<int>(a, 17), P<unsigned>(a, 18),
                                I(a, 19), I(a, 20), I(a, 21), I(a, 22), I(a, 23));
    });
}
}  // namespace

// The (ipt, sub) instantiations of plan.BLOCK_VARIANTS.
template <typename IdT>
int block_variant(int ipt, int sub, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (ipt == 1 && sub == 1) run_block<IdT, 1, 1>(grid, block, smem, a);
    else if (ipt == 4 && sub == 1) run_block<IdT, 4, 1>(grid, block, smem, a);
    else if (ipt == 4 && sub == 4) run_block<IdT, 4, 4>(grid, block, smem, a);
    else if (ipt == 8 && sub == 1) run_block<IdT, 8, 1>(grid, block, smem, a);
    else if (ipt == 8 && sub == 8) run_block<IdT, 8, 8>(grid, block, smem, a);
    else if (ipt == 16 && sub == 16) run_block<IdT, 16, 16>(grid, block, smem, a);
    else if constexpr (sizeof(IdT) == 4) {
        if (ipt == 16 && sub == 1) run_block<IdT, 16, 1>(grid, block, smem, a);
        else return 1;
    } else {
        return 1;
    }
    return 0;
}

extern "C" int emu_block(int id64, int ipt, int sub, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    return id64 ? block_variant<long long>(ipt, sub, grid, block, smem, a)
                : block_variant<int>(ipt, sub, grid, block, smem, a);
}

extern "C" int emu_warp(int id64, int spl, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (block != 32) return 2;  // one warp: __syncwarp is its only barrier
    if (id64) {
        if (spl == 1) run_warp<long long, 1>(grid, block, smem, a);
        else if (spl == 4) run_warp<long long, 4>(grid, block, smem, a);
        else if (spl == 16) run_warp<long long, 16>(grid, block, smem, a);
        else return 1;
    } else {
        if (spl == 1) run_warp<int, 1>(grid, block, smem, a);
        else if (spl == 4) run_warp<int, 4>(grid, block, smem, a);
        else if (spl == 16) run_warp<int, 16>(grid, block, smem, a);
        else return 1;
    }
    return 0;
}

// The spl instantiations of plan.LANE_IPTS, for EPL experts per lane.
template <typename IdT, int EPL>
int lane_variant(int spl, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (spl == 1) run_lane<IdT, 1, EPL>(grid, block, smem, a);
    else if (spl == 4) run_lane<IdT, 4, EPL>(grid, block, smem, a);
    else return 1;
    return 0;
}

extern "C" int emu_lane(int id64, int spl, int epl, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (block != 32) return 2;  // one warp: __syncwarp is its only barrier
    if (epl != 1 && epl != 2) return 1;
    if (id64) return epl == 1 ? lane_variant<long long, 1>(spl, grid, block, smem, a)
                              : lane_variant<long long, 2>(spl, grid, block, smem, a);
    return epl == 1 ? lane_variant<int, 1>(spl, grid, block, smem, a) : lane_variant<int, 2>(spl, grid, block, smem, a);
}

// The ipt instantiations of plan.BLOCK_IPTS, for EPL experts per lane.
template <typename IdT, int EPL>
int block_lane_variant(int ipt, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (ipt == 1) run_block_lane<IdT, 1, EPL>(grid, block, smem, a);
    else if (ipt == 4) run_block_lane<IdT, 4, EPL>(grid, block, smem, a);
    else if (ipt == 8) run_block_lane<IdT, 8, EPL>(grid, block, smem, a);
    else if (ipt == 16) run_block_lane<IdT, 16, EPL>(grid, block, smem, a);
    else return 1;
    return 0;
}

extern "C" int emu_block_lane(int id64, int ipt, int epl, unsigned grid, unsigned block, size_t smem,
                              const int64_t* a) {
    if (epl != 1 && epl != 2) return 1;
    if (id64) return epl == 1 ? block_lane_variant<long long, 1>(ipt, grid, block, smem, a)
                              : block_lane_variant<long long, 2>(ipt, grid, block, smem, a);
    return epl == 1 ? block_lane_variant<int, 1>(ipt, grid, block, smem, a)
                    : block_lane_variant<int, 2>(ipt, grid, block, smem, a);
}

// The ipt instantiations of plan.CLUSTER_IPTS, for EPL experts per lane and a cluster of CB blocks.
template <typename IdT, int EPL, int CB>
int cluster_lane_variant(int ipt, unsigned block, size_t smem, const int64_t* a) {
    if (ipt == 1) run_cluster_lane<IdT, 1, EPL, CB>(block, smem, a);
    else if (ipt == 2) run_cluster_lane<IdT, 2, EPL, CB>(block, smem, a);
    else if (ipt == 4) run_cluster_lane<IdT, 4, EPL, CB>(block, smem, a);
    else if (ipt == 8) run_cluster_lane<IdT, 8, EPL, CB>(block, smem, a);
    else return 1;
    return 0;
}

// The cluster sizes of plan.CLUSTER_SIZES (the launch is one cluster: grid = its blocks = the kernel's CB).
template <typename IdT, int EPL>
int cluster_size_variant(int ipt, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (grid == 8) return cluster_lane_variant<IdT, EPL, 8>(ipt, block, smem, a);
    if (grid == 16) return cluster_lane_variant<IdT, EPL, 16>(ipt, block, smem, a);
    return 2;
}

extern "C" int emu_cluster_lane(int id64, int ipt, int epl, int cb, unsigned grid, unsigned block, size_t smem,
                                const int64_t* a) {
    if (grid != (unsigned)cb) return 2;  // one cluster, its size compiled in (a GPU refuses any other grid too)
    if (epl != 1 && epl != 2) return 1;
    if (id64) return epl == 1 ? cluster_size_variant<long long, 1>(ipt, grid, block, smem, a)
                              : cluster_size_variant<long long, 2>(ipt, grid, block, smem, a);
    return epl == 1 ? cluster_size_variant<int, 1>(ipt, grid, block, smem, a)
                    : cluster_size_variant<int, 2>(ipt, grid, block, smem, a);
}

extern "C" int emu_count(int id64, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (id64) run_count<long long>(grid, block, smem, a);
    else run_count<int>(grid, block, smem, a);
    return 0;
}

extern "C" int emu_scan(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch(grid, block, smem, [a] {
        grid_scan(P<int>(a, 0), I(a, 1), P<const int>(a, 2), I(a, 3), P<int>(a, 4), I(a, 5), I(a, 6), P<int>(a, 7),
                  P<int>(a, 8), P<int>(a, 9), P<int>(a, 10), I(a, 11), I(a, 12));
    });
    return 0;
}

extern "C" int emu_place(unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    hc_launch(grid, block, smem, [a] {
        grid_place(P<const int>(a, 0), P<const unsigned char>(a, 1), I(a, 2), I(a, 3), P<const int>(a, 4), I(a, 5),
                   P<const int>(a, 6), P<const int>(a, 7), I(a, 8), I(a, 9), I(a, 10), P<int>(a, 11), P<int>(a, 12),
                   I(a, 13), I(a, 14), I(a, 15));
    });
    return 0;
}

// stage16: grid_fused's stage entries are unsigned short (else unsigned).
extern "C" int emu_fused(int id64, int stage16, unsigned grid, unsigned block, size_t smem, const int64_t* a) {
    if (id64) {
        if (stage16) run_fused<long long, unsigned short>(grid, block, smem, a);
        else run_fused<long long, unsigned>(grid, block, smem, a);
    } else {
        if (stage16) run_fused<int, unsigned short>(grid, block, smem, a);
        else run_fused<int, unsigned>(grid, block, smem, a);
    }
    return 0;
}

// Blocks that wrote past their dynamic shared memory since the last call (see hc_block::check_guard).
extern "C" int emu_smem_overflows() { return hc_smem_overflows.exchange(0); }
