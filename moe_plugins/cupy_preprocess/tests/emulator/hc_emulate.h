// A CPU emulation of the small part of CUDA that csrc/preprocess.cu uses, for tests without a GPU.
//
// Every CUDA thread of a block is an OS thread; blocks run one after another (hc_launch), or all at once
// for a cooperative launch (hc_launch_cooperative: grid-wide barriers need every block running) and for a
// launch of one thread-block cluster (hc_launch_cluster: the cluster barrier's two halves and each block's view of
// the others' dynamic shared memory, the hc_cluster_* functions the .cu takes from here under HC_EMULATOR). __syncthreads is a
// barrier of the block's threads, __syncwarp and the warp intrinsics (shfl, match_any) are barriers of
// the warp's 32 threads around an exchange buffer. This checks the kernels' logic (indexing, scans,
// stable ranks, window and tile bookkeeping, what the launch sequence hands from kernel to kernel) on
// real inputs; it says nothing about speed, and memory-model subtleties are checked on the GPU
// (compute-sanitizer racecheck/memcheck/initcheck).
//
// Dynamic shared memory is filled with garbage before each block (to catch reads of unwritten
// counters); 64 zero words sit below it, like the global map's head, and guard words above it: a block
// that writes past the size it was launched with is counted in hc_smem_overflows (on a GPU such a write
// faults or lands in another block's memory).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define HC_EMULATOR 1
#define HC_CLUSTER_DIMS(blocks)

struct hc_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local hc_dim3 threadIdx;
inline thread_local hc_dim3 blockIdx;
inline hc_dim3 blockDim;
inline hc_dim3 gridDim;

struct hc_block_state {
    std::unique_ptr<std::barrier<>> block_barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    std::vector<long long> exchange;  // 32 slots per warp
};

// Per thread: the state and dynamic shared memory of the block the thread belongs to.
inline thread_local hc_block_state* hc_state = nullptr;
inline thread_local int* hc_dynamic_smem = nullptr;
constexpr int HC_SMEM_HEAD = 64;
constexpr int HC_SMEM_TAIL = 256;
constexpr int HC_SMEM_GUARD = 0x5eed5eed;
inline std::atomic<int> hc_smem_overflows{0};  // blocks that wrote into their guard words

// CUDA's vector types, as the kernels use them.
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) longlong2 { long long x, y; };
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

// The one cluster of a cluster launch: a barrier of all its threads, every block's dynamic shared memory.
struct hc_cluster_state {
    std::unique_ptr<std::barrier<>> barrier;
    std::vector<int*> smem;
};
inline thread_local hc_cluster_state* hc_cluster = nullptr;
inline thread_local std::optional<std::barrier<>::arrival_token> hc_cluster_token;

inline void hc_cluster_arrive_relaxed() { hc_cluster_token.emplace(hc_cluster->barrier->arrive()); }
inline void hc_cluster_wait() {
    hc_cluster->barrier->wait(std::move(*hc_cluster_token));
    hc_cluster_token.reset();
}

// Block `rank`'s copy of an address in this block's dynamic shared memory (the kernels keep everything there).
template <typename T>
inline T* hc_cluster_peer(T* p, int rank) {
    const char* base = reinterpret_cast<const char*>(hc_dynamic_smem);
    return reinterpret_cast<T*>(reinterpret_cast<char*>(hc_cluster->smem.at(rank)) + (reinterpret_cast<char*>(p) - base));
}

// An mbarrier as two ints: the bytes that arrived (word 0), and the bytes expected plus 2^30 once its one arrival
// came (word 1). The waiter spins until both are set and equal.
inline int* hc_mbar_words(unsigned long long* bar) { return reinterpret_cast<int*>(bar); }
inline void hc_mbar_init(unsigned long long* bar) {
    __atomic_store_n(&hc_mbar_words(bar)[0], 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&hc_mbar_words(bar)[1], 0, __ATOMIC_SEQ_CST);
}
inline void hc_store_async(int4* dst, int rank, int4 value, unsigned long long* bar) {
    int* to = reinterpret_cast<int*>(hc_cluster_peer(dst, rank));
    const int words[4] = {value.x, value.y, value.z, value.w};
    for (int i = 0; i < 4; ++i) __atomic_store_n(to + i, words[i], __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&hc_mbar_words(hc_cluster_peer(bar, rank))[0], 16, __ATOMIC_SEQ_CST);
}
inline void hc_mbar_expect(unsigned long long* bar, unsigned bytes) {
    __atomic_store_n(&hc_mbar_words(bar)[1], (int)bytes + (1 << 30), __ATOMIC_SEQ_CST);
}
inline void hc_mbar_inval(unsigned long long* bar) { hc_mbar_init(bar); }
inline void hc_mbar_wait(unsigned long long* bar) {
    const int* w = hc_mbar_words(bar);
    for (;;) {
        const int expected = __atomic_load_n(&w[1], __ATOMIC_SEQ_CST);
        if (expected && __atomic_load_n(&w[0], __ATOMIC_SEQ_CST) == expected - (1 << 30)) return;
        std::this_thread::yield();
    }
}

using std::max;
using std::min;

inline void __syncthreads() { hc_state->block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { hc_state->warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }

// Exchange one value per lane: every lane writes, the warp meets, every lane reads, the warp meets again.
template <typename T, typename Read>
inline T hc_exchange(T v, Read read) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    long long* slots = &hc_state->exchange[warp * 32];
    long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[lane] = bits;
    __syncwarp();
    T out = read(slots, lane);
    __syncwarp();
    return out;
}

template <typename T>
inline T hc_slot_value(const long long* slots, int lane) {
    T out;
    std::memcpy(&out, &slots[lane], sizeof(T));
    return out;
}

template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
    return hc_exchange(v, [src](const long long* s, int) { return hc_slot_value<T>(s, src & 31); });
}

template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned d) {
    return hc_exchange(v, [v, d](const long long* s, int lane) {
        return lane >= (int)d ? hc_slot_value<T>(s, lane - (int)d) : v;
    });
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int d) {
    return hc_exchange(v, [d](const long long* s, int lane) { return hc_slot_value<T>(s, lane ^ d); });
}

inline unsigned __ballot_sync(unsigned, int predicate) {
    return hc_exchange(predicate ? 1u : 0u, [](const long long* s, int) {
        unsigned mask = 0;
        for (int l = 0; l < 32; ++l)
            if (hc_slot_value<unsigned>(s, l)) mask |= 1u << l;
        return mask;
    });
}

inline unsigned __match_any_sync(unsigned, int v) {
    return hc_exchange(0u + (unsigned)v, [v](const long long* s, int) {
        unsigned mask = 0;
        for (int l = 0; l < 32; ++l)
            if (hc_slot_value<int>(s, l) == v) mask |= 1u << l;
        return mask;
    });
}

// One block's barriers, exchange slots and dynamic shared memory (garbage-filled; 64 zero words below it,
// HC_SMEM_TAIL guard words above it).
struct hc_block {
    hc_block_state state;
    std::vector<int> smem;
    size_t words;

    hc_block(unsigned block, size_t smem_bytes, unsigned b) : words((smem_bytes + 3) / 4) {
        state.block_barrier = std::make_unique<std::barrier<>>(block);
        for (unsigned w = 0; w < block / 32; ++w) state.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        state.exchange.assign(block, 0);
        smem.assign(HC_SMEM_HEAD + words + HC_SMEM_TAIL, HC_SMEM_GUARD);
        for (size_t i = 0; i < HC_SMEM_HEAD; ++i) smem[i] = 0;
        for (size_t i = HC_SMEM_HEAD; i < HC_SMEM_HEAD + words; ++i) smem[i] = (int)(0x5bd1e995u * (i + b));
    }

    // After the block ran: count it in hc_smem_overflows if it wrote past its dynamic shared memory.
    void check_guard() const {
        for (size_t i = HC_SMEM_HEAD + words; i < smem.size(); ++i)
            if (smem[i] != HC_SMEM_GUARD) {
                ++hc_smem_overflows;
                return;
            }
    }
};

// Start block b's threads (they run kernel() with their block's state) and append them to `threads`.
inline void hc_start_block(hc_block& blk, unsigned b, unsigned block, const std::function<void()>& kernel,
                           std::vector<std::thread>& threads, hc_cluster_state* cluster = nullptr) {
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([t, b, &blk, &kernel, cluster] {
            threadIdx = {t, 1, 1};
            blockIdx = {b, 1, 1};
            hc_state = &blk.state;
            hc_cluster = cluster;
            hc_dynamic_smem = blk.smem.data() + HC_SMEM_HEAD;
            kernel();
        });
}

// Run kernel() on grid x block threads, blocks in order, with `smem_bytes` of dynamic shared memory.
inline void hc_launch(unsigned grid, unsigned block, size_t smem_bytes, const std::function<void()>& kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        hc_block blk(block, smem_bytes, b);
        std::vector<std::thread> threads;
        threads.reserve(block);
        hc_start_block(blk, b, block, kernel, threads);
        for (auto& th : threads) th.join();
        blk.check_guard();
    }
}

// A cooperative launch: every block's threads run at the same time (grid * block OS threads), so a
// grid-wide barrier built from global atomics works as on a co-resident GPU grid.
inline void hc_launch_cooperative(unsigned grid, unsigned block, size_t smem_bytes, const std::function<void()>& kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    std::vector<std::unique_ptr<hc_block>> blocks;
    for (unsigned b = 0; b < grid; ++b) blocks.push_back(std::make_unique<hc_block>(block, smem_bytes, b));
    std::vector<std::thread> threads;
    threads.reserve((size_t)grid * block);
    for (unsigned b = 0; b < grid; ++b) hc_start_block(*blocks[b], b, block, kernel, threads);
    for (auto& th : threads) th.join();
    for (const auto& blk : blocks) blk->check_guard();
}

// A launch of ONE thread-block cluster of `grid` blocks: every block's threads run at the same time, and the
// cluster barrier counts all of them.
inline void hc_launch_cluster(unsigned grid, unsigned block, size_t smem_bytes, const std::function<void()>& kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    std::vector<std::unique_ptr<hc_block>> blocks;
    hc_cluster_state cluster;
    cluster.barrier = std::make_unique<std::barrier<>>((std::ptrdiff_t)grid * block);
    for (unsigned b = 0; b < grid; ++b) {
        blocks.push_back(std::make_unique<hc_block>(block, smem_bytes, b));
        cluster.smem.push_back(blocks.back()->smem.data() + HC_SMEM_HEAD);
    }
    std::vector<std::thread> threads;
    threads.reserve((size_t)grid * block);
    for (unsigned b = 0; b < grid; ++b) hc_start_block(*blocks[b], b, block, kernel, threads, &cluster);
    for (auto& th : threads) th.join();
    for (const auto& blk : blocks) blk->check_guard();
}
