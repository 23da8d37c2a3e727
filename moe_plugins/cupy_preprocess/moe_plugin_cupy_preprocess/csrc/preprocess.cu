// Fused expert-map preprocess for hostcore: global top-k ids -> local ids, per-expert counts and the
// aligned block layout (hostcore.contract.AlignedLayout), in one launch at every size: lane_preprocess
// (one warp, one or two local experts per lane) or warp_preprocess (one warp) for the smallest batches,
// block_preprocess (independent blocks that each count every slot and place their own) for small inputs,
// cluster_lane_preprocess (one thread-block cluster of 8 or 16 blocks that split the slots, sm_90+) for small
// inputs past one block, grid_fused (one cooperative launch of a co-resident grid) for large ones.
// grid_count -> grid_scan -> grid_place (three launches per window of 1024 experts) remain for ranks with
// more than 1024 local experts and for devices without cooperative launches.
//
// Compiled at run time by CuPy (NVRTC, no includes) with the template instantiations named in
// moe_plugin_cupy_preprocess/jit.py; `nvcc -DHOSTCORE_NVCC_CHECK -arch=sm_90 -Xptxas -v -c` compiles the
// same instantiations for a resource report (registers, spills) without a GPU.
//
// Data (all int32 unless said; every pointer is device memory owned by the caller):
//   ids        [nk] int32 or int64 global expert ids (the [N, K] routing, row-major, contiguous)
//   gmap       [map_size] expert map global -> local (-1: not on this rank); guard slots included.
//              The Python side allocates 64 zero entries *before* gmap (see `faithful` below).
//   local_ids  [nk] out: local id of every slot, -1 = skip
//   counts     [num_local] out: slots per local expert
//   invalid    [1] out: ids outside the map (safe mode; see map_one)
//   sorted     [capacity] out: slot indices grouped by local expert, each group padded with nk to a
//              multiple of block_m, slots of one expert in increasing slot order (a stable counting sort,
//              identical to the torch reference); entries past the total are nk as well
//   block_ids  [capacity / block_m] out: local expert of each block, -1 past the total
//   total      [1] out: entries of `sorted` in use (a multiple of block_m)
// block_m == 0 means "no aligned layout": sorted/block_ids/total are not touched.
//
// Stable order: slots are processed in tiles of consecutive slot indices (in grid_fused: one chunk per
// block); inside a tile each warp owns a contiguous segment and walks it 32 slots at a time (grid_fused
// lists a segment's local slots in slot order and ranks them 32 at a time: the same order). A slot's
// position in its expert group is
//   (group start) + (its expert's slots in earlier tiles) + (in earlier warps of its tile)
//   + (in earlier chunks of its warp) + (in lower lanes of its chunk, from warp ballots),
// so no atomics decide any position and the result is deterministic.
//
// Experts are handled in windows of at most `window` (<= 1024) local experts so that the per-warp
// counters fit in shared memory for any number of local experts; with more local experts than that the
// passes repeat per window (slower, same result).

#define HC_FULL_MASK 0xffffffffu
#define HC_MAP_NONE 0
#define HC_MAP_SHARED 1
#define HC_MAP_GLOBAL 2
#define HC_BLOCK_THREADS 1024  // block kernel: threads per block (each block maps and counts every slot)
#define HC_GRID_THREADS 512    // tile kernels of the multi-block path
#define HC_GRID_IPT 8          // slots per thread in a tile
#define HC_TILE (HC_GRID_THREADS * HC_GRID_IPT)
#define HC_SCAN_THREADS 1024
#define HC_SCRATCH 40  // shared ints for block scans and small flags
#define HC_NO_KEY8 255  // keys8 entry of a slot that is not local
#define HC_TAIL_PIECE 512  // grid_fused phase 3: entries of the tail of `sorted` per piece

// Phase timestamps for bench/preprocess/phase_trace.py (compiled only with -DHC_TRACE): thread 0 of block 0
// stores clock64() at mark i into hc_trace[i] (and %globaltimer into hc_trace[32 + i], to convert cycles
// to nanoseconds); thread 0 of every block b < HC_TRACE_BLOCKS stores the same pair into
// hc_trace_blocks[(b * 32 + i) * 2 + {0, 1}] (how the phases spread over the grid) and its SM's id into
// hc_trace_smid[b]. Without HC_TRACE a mark is nothing.
#ifdef HC_TRACE
#define HC_TRACE_BLOCKS 1024
extern "C" {
__device__ unsigned long long hc_trace[64];
__device__ unsigned long long hc_trace_blocks[HC_TRACE_BLOCKS * 64];
__device__ unsigned hc_trace_smid[HC_TRACE_BLOCKS];
}
#define HC_MARK(i)                                                                                   \
    do {                                                                                             \
        if (threadIdx.x == 0 && blockIdx.x < HC_TRACE_BLOCKS) {                                      \
            unsigned long long hc_t;                                                                 \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(hc_t));                                  \
            const unsigned long long hc_c = clock64();                                               \
            hc_trace_blocks[(blockIdx.x * 32 + (i)) * 2] = hc_c;                                     \
            hc_trace_blocks[(blockIdx.x * 32 + (i)) * 2 + 1] = hc_t;                                 \
            unsigned hc_sm;                                                                          \
            asm volatile("mov.u32 %0, %%smid;" : "=r"(hc_sm));                                        \
            hc_trace_smid[blockIdx.x] = hc_sm;                                                       \
            if (blockIdx.x == 0) {                                                                   \
                hc_trace[i] = hc_c;                                                                  \
                hc_trace[32 + (i)] = hc_t;                                                           \
            }                                                                                        \
        }                                                                                            \
    } while (0)
#else
#define HC_MARK(i) ((void)0)
#endif

// Lanes below this one (what %lanemask_lt holds; computed so the source needs no inline asm).
__device__ __forceinline__ unsigned hc_lanemask_lt() { return (1u << (threadIdx.x & 31)) - 1u; }

__device__ __forceinline__ int hc_round_up(int x, int m) { return (x + m - 1) / m * m; }

// Thread-block clusters (sm_90+; cluster_lane_preprocess only). The launch is ONE cluster of CB blocks, a
// compile-time size (HC_CLUSTER_DIMS(CB): a plain cuLaunchKernel takes it): 8, the size every sm_90 device
// guarantees, or 16, which the host allows per kernel (CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED) and
// takes where the driver says such a cluster fits (jit.py).
// - A cluster barrier is hc_cluster_arrive_relaxed by every thread of the cluster, later hc_cluster_wait (acquire).
// - The blocks exchange words through distributed shared memory with asynchronous remote stores that complete on
//   the receiving block's mbarrier (a shared 64-bit transaction counter): no fence on the sending side (a release
//   arrive at a cluster barrier costs a MEMBAR.ALL.GPU, which waits for the warp's global stores).
//   hc_mbar_init (one thread, then a cluster barrier before any block stores into it), hc_store_async (16 bytes to
//   the same shared address in block `rank`, counted on that block's mbarrier), hc_mbar_expect (one thread of the
//   receiving block: the bytes that will come, and its one arrival), hc_mbar_wait (until they all came; phase 0),
//   hc_mbar_inval (one thread, once every waiter is through: the PTX ISA asks for it before the memory is used for
//   anything else, and the next kernel on the SM reuses it).
// The CPU emulator (tests/emulator/hc_emulate.h) defines HC_EMULATOR and its own versions of these.
#ifndef HC_EMULATOR
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define HC_CLUSTER_DIMS(blocks) __cluster_dims__(blocks, 1, 1)
__device__ __forceinline__ unsigned hc_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void hc_cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void hc_cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
__device__ __forceinline__ void hc_mbar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\tfence.mbarrier_init.release.cluster;"
                 :: "r"(hc_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void hc_store_async(int4* dst, int rank, int4 value, unsigned long long* bar) {
    unsigned rdst, rbar;
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rdst) : "r"(hc_smem_addr(dst)), "r"(rank));
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rbar) : "r"(hc_smem_addr(bar)), "r"(rank));
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.s32 [%0], {%1, %2, %3, %4}, [%5];"
                 :: "r"(rdst), "r"(value.x), "r"(value.y), "r"(value.z), "r"(value.w), "r"(rbar) : "memory");
}
__device__ __forceinline__ void hc_mbar_expect(unsigned long long* bar, unsigned bytes) {
    // (the arrival's phase token goes to the sink: the wait goes by parity)
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(hc_smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void hc_mbar_wait(unsigned long long* bar) {
    asm volatile("{\n\t.reg .pred done;\n"
                 "HC_MBAR_WAIT:\n\t"
                 "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], 0;\n\t"
                 "@!done bra HC_MBAR_WAIT;\n}"
                 :: "r"(hc_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void hc_mbar_inval(unsigned long long* bar) {
    asm volatile("mbarrier.inval.shared::cta.b64 [%0];" :: "r"(hc_smem_addr(bar)) : "memory");
}
#else  // compiled for an older GPU: plan.py never launches the cluster kernel there
#define HC_CLUSTER_DIMS(blocks)
__device__ __forceinline__ void hc_cluster_arrive_relaxed() { __trap(); }
__device__ __forceinline__ void hc_cluster_wait() { __trap(); }
__device__ __forceinline__ void hc_mbar_init(unsigned long long*) { __trap(); }
__device__ __forceinline__ void hc_store_async(int4*, int, int4, unsigned long long*) { __trap(); }
__device__ __forceinline__ void hc_mbar_expect(unsigned long long*, unsigned) { __trap(); }
__device__ __forceinline__ void hc_mbar_wait(unsigned long long*) { __trap(); }
__device__ __forceinline__ void hc_mbar_inval(unsigned long long*) { __trap(); }
#endif
#endif

// Global id -> local id. `bad` says whether the id breaks the sentinel contract (counted in safe mode):
// with a map, ids outside [0, map_size); without one, negative ids (an id >= E is the out_of_range
// sentinel and simply not local). This is exactly what hostcore's torch reference counts.
//
// faithful != 0 reads the map without any bounds check, like vLLM's preprocessTopkIdKernel: a negative id
// reads before the table. For the shared-memory map that is the block's shared memory below the dynamic
// allocation (the map is its first entry); for the global map it is one of the 64 zero entries the
// Python side puts before the table (ids below -64 or past the end read outside the allocation:
// undefined, as in the upstream kernel). int64 ids are truncated to int32 first, as an int32 index would.
template <typename IdT>
__device__ __forceinline__ int map_one(IdT raw, int map_mode, int faithful, const int* smap,
                                       const int* __restrict__ gmap, int map_size, int first, int num_local,
                                       int& bad) {
    const long long v = (long long)raw;
    if (map_mode == HC_MAP_NONE) {
        const long long shifted = v - first;
        bad = v < 0;
        return (shifted >= 0 && shifted < num_local) ? (int)shifted : -1;
    }
    if (faithful) {
        bad = 0;
        const int index = (int)v;
        return map_mode == HC_MAP_SHARED ? smap[index] : gmap[index];
    }
    const bool inside = v >= 0 && v < map_size;
    bad = !inside;
    if (!inside) return -1;
    return map_mode == HC_MAP_SHARED ? smap[(int)v] : __ldg(gmap + v);
}

// The layout key of a local id: itself if it names a local expert, else -1. (In faithful mode a read
// before the table can return anything; values outside [0, num_local) stay in local_ids as read but are
// kept out of counts and layout so that this kernel itself never writes out of bounds.)
__device__ __forceinline__ int layout_key(int local, int num_local) {
    return (unsigned)local < (unsigned)num_local ? local : -1;
}

// Slot i with id `raw` (anything when i >= nk): store its local id (unless local_ids is null: a block that maps
// a slot it does not own), return its layout key (-1 past nk or not local) and set `bad` (0 past nk) when the id
// breaks the sentinel contract.
template <typename IdT>
__device__ __forceinline__ int map_slot(IdT raw, int i, int nk, int map_mode, int faithful, const int* smap,
                                        const int* __restrict__ gmap, int map_size, int first, int num_local,
                                        int* __restrict__ local_ids, int& bad) {
    bad = 0;
    if (i >= nk) return -1;
    const int local = map_one(raw, map_mode, faithful, smap, gmap, map_size, first, num_local, bad);
    if (local_ids != nullptr) local_ids[i] = local;
    return layout_key(local, num_local);
}

// Map this lane's IPT slots of a warp segment (slot seg + c * 32 + lane for chunk c; `raw` holds their ids,
// anything past nk): store every local id, return the layout keys in `key` (-1 past nk or not local) and add
// the ids that break the sentinel contract to `bad_here`. Used by grid_count.
template <typename IdT, int IPT>
__device__ __forceinline__ void map_chunks(const IdT (&raw)[IPT], int seg, int nk, int map_mode, int faithful,
                                           const int* smap, const int* __restrict__ gmap, int map_size, int first,
                                           int num_local, int* __restrict__ local_ids, int (&key)[IPT],
                                           int& bad_here) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < IPT; ++c) {
        int bad;
        key[c] = map_slot(raw[c], seg + c * 32 + lane, nk, map_mode, faithful, smap, gmap, map_size, first, num_local,
                          local_ids, bad);
        bad_here += bad;
    }
}

// Key relative to the expert window [e0, e0 + wl), or -1 outside it.
__device__ __forceinline__ int window_key(int key, int e0, int wl) {
    const int k = key - e0;
    return (unsigned)k < (unsigned)wl ? k : -1;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(HC_FULL_MASK, v, d);
    return v;
}

__device__ __forceinline__ int warp_inclusive_scan(int v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int t = __shfl_up_sync(HC_FULL_MASK, v, d);
        if (lane >= d) v += t;
    }
    return v;
}

// Exclusive prefix sum of a[0..n) in place, by the whole block (every thread must call it: it contains
// __syncthreads). `a` may be shared or global memory; `scratch` is >= 33 shared ints. Returns the total
// (the same value in every thread).
__device__ int block_exclusive_scan(int* a, int n, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int carry = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const int v = i < n ? a[i] : 0;
        const int inclusive = warp_inclusive_scan(v);
        if (lane == 31) scratch[warp] = inclusive;
        __syncthreads();
        if (warp == 0) {
            int s = lane < nwarps ? scratch[lane] : 0;
            s = warp_inclusive_scan(s);
            if (lane < nwarps) scratch[lane] = s;
        }
        __syncthreads();
        if (i < n) a[i] = carry + (warp ? scratch[warp - 1] : 0) + inclusive - v;
        carry += scratch[nwarps - 1];
        __syncthreads();  // scratch is rewritten by the next chunk
    }
    return carry;
}

// Copy the expert map into shared memory in ONE memory round trip whatever the block size: every thread
// issues all its loads (16-byte vectors when the map is aligned, up to 4 per thread per pass) before its
// first shared store. A plain `for (e = tid; e < map_size; e += blockDim.x)` loop costs one dependent
// round trip per few iterations, which on the 32-thread decode block (a 257-entry map: 9 iterations) was
// the extra microsecond between GPU run 1 (1024 threads) and run 2 (see GPU_RESULTS.md).
// Every thread must call it; the caller's __syncthreads publishes the copy. smap is 16-byte aligned
// (the start of the dynamic shared memory).
__device__ __forceinline__ void hc_copy_map(int* smap, const int* __restrict__ gmap, int map_size) {
    const int tid = threadIdx.x, nt = blockDim.x;
    if ((reinterpret_cast<unsigned long long>(gmap) & 15ull) == 0) {
        const int nvec = map_size >> 2, rest = map_size - (nvec << 2);
        const int4* g4 = reinterpret_cast<const int4*>(gmap);
        int4* s4 = reinterpret_cast<int4*>(smap);
        const int tail = tid < rest ? __ldg(gmap + (nvec << 2) + tid) : 0;  // issued with the vectors
        for (int v0 = 0; v0 < nvec; v0 += 4 * nt) {
            int4 x[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int v = v0 + u * nt + tid;
                if (v < nvec) x[u] = __ldg(g4 + v);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int v = v0 + u * nt + tid;
                if (v < nvec) s4[v] = x[u];
            }
        }
        if (tid < rest) smap[(nvec << 2) + tid] = tail;
        return;
    }
    for (int e0 = 0; e0 < map_size; e0 += 8 * nt) {  // unaligned map (never from plan.py's buffers)
        int x[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int e = e0 + u * nt + tid;
            x[u] = e < map_size ? __ldg(gmap + e) : 0;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int e = e0 + u * nt + tid;
            if (e < map_size) smap[e] = x[u];
        }
    }
}

// Fill a[lo, hi) with `value` (0 <= lo, hi < 2^31: plan.py keeps every buffer under int32 indexing),
// 16-byte stores for the aligned middle: thread `t` of `nt` cooperating threads (the whole grid, or one
// block). Any int alignment of `a` works (the tests offset buffers by guard words): the < 4 entries before
// the first aligned one and after the last vector are one store each by threads 0..3. Stores only: nothing
// in the kernel waits on them.
__device__ __forceinline__ void hc_fill(int* __restrict__ a, int lo, int hi, int value, int t, int nt) {
    if (lo >= hi) return;
    const unsigned misalign = (unsigned)reinterpret_cast<unsigned long long>(a + lo) & 15u;
    const int head = min(hi - lo, (int)(((16u - misalign) & 15u) >> 2));  // entries before the first 16 B boundary
    const int mid = lo + head, nvec = (hi - mid) >> 2, rest = mid + (nvec << 2);
    if (t < head) a[lo + t] = value;
    int4* a4 = reinterpret_cast<int4*>(a + mid);
    const int4 w = make_int4(value, value, value, value);
    for (unsigned v = t; v < (unsigned)nvec; v += nt) a4[v] = w;
    if (t < hi - rest) a[rest + t] = value;
}

// hc_fill for one warp and int bounds (0 <= lo, hi < 2^31): the lanes of the calling warp fill a[lo, hi),
// with evict-first stores (nothing reads them in the kernel).
__device__ __forceinline__ void hc_fill_warp(int* __restrict__ a, int lo, int hi, int value) {
    if (lo >= hi) return;
    const int lane = threadIdx.x & 31;
    const int head = min(hi - lo, (int)(((16u - ((unsigned)reinterpret_cast<unsigned long long>(a + lo) & 15u)) & 15u) >> 2));
    const int mid = lo + head, nvec = (hi - mid) >> 2, rest = mid + (nvec << 2);
    if (lane < head) a[lo + lane] = value;
    int4* a4 = reinterpret_cast<int4*>(a + mid);
    const int4 w = make_int4(value, value, value, value);
    for (int v = lane; v < nvec; v += 32) __stcs(a4 + v, w);  // streaming 16-byte stores (a plain `a4[v] = w`
                                                              // here came out of NVVM as four 4-byte stores)
    if (rest + lane < hi) a[rest + lane] = value;
}

// a[p, end) = value by the lanes of the calling warp, end - p <= HC_TAIL_PIECE, a + p 16-byte aligned: one
// streaming 16-byte store per lane and 128 entries (a shorter last vector as scalar stores). Warp-uniform.
__device__ __forceinline__ void hc_fill_piece(int* __restrict__ a, int p, int end, int value) {
    const int lane = threadIdx.x & 31;
    const int4 w = make_int4(value, value, value, value);
#pragma unroll
    for (int j = 0; j < HC_TAIL_PIECE / 128; ++j) {
        const int i = p + (j * 32 + lane) * 4;
        if (end - i >= 4) {
            __stcs(reinterpret_cast<int4*>(a + i), w);
        } else {  // end - i < 4
            if (i < end) a[i] = value;
            if (i + 1 < end) a[i + 1] = value;
            if (i + 2 < end) a[i + 2] = value;
        }
    }
}

// First index in a[0..n) whose value is > x (a sorted ascending).
__device__ __forceinline__ int upper_bound(const int* a, int n, int x) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (a[mid] <= x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Bits needed for window keys 0..wl-1 (at least 1).
__device__ __forceinline__ int key_bits(int wl) {
    int bits = 1;
    while ((1 << bits) < wl) ++bits;
    return bits;
}

// The lanes of this warp whose window key equals this lane's (keys in [0, 2^bits), or -1), built from
// bits + 1 ballots, a fixed cost whatever the keys are. (The first version used __match_any_sync; see
// GPU_RESULTS.md for the timings of both on the H100.)
// `valid` is the ballot of k >= 0, when the caller has it already.
__device__ __forceinline__ unsigned warp_peers_of(unsigned valid, int k, int bits) {
    unsigned peers = k >= 0 ? valid : ~valid;
    for (int b = 0; b < bits; ++b) {
        const bool set = (k >> b) & 1;
        const unsigned mask = __ballot_sync(HC_FULL_MASK, set);
        peers &= set ? mask : ~mask;
    }
    return peers;
}
__device__ __forceinline__ unsigned warp_peers(int k, int bits) {
    return warp_peers_of(__ballot_sync(HC_FULL_MASK, k >= 0), k, bits);
}

// Per-warp counts of the window keys of this thread's IPT slots: row `row` of `cnt` (window ints) gets
// +1 per slot. Shared-memory atomics: order does not matter for counts.
template <int IPT>
__device__ __forceinline__ void warp_count(const int (&key)[IPT], int e0, int wl, int* row) {
#pragma unroll
    for (int c = 0; c < IPT; ++c) {
        const int k = window_key(key[c], e0, wl);
        if (k >= 0) atomicAdd(&row[k], 1);
    }
}

// Stable ranks: row[k] holds, per window key, the position of this warp's next slot of expert k; each
// slot gets row[k] + (lower lanes of its chunk with the same key) and the row advances by the group size.
// One leader per group of equal keys updates the row, so no atomics; __syncwarp orders one chunk's
// update before the next chunk's read (leaders can differ between chunks).
// emit(c, k, pos) is called for every slot in the window.
template <int IPT, typename Emit>
__device__ __forceinline__ void warp_rank(const int (&key)[IPT], int e0, int wl, int* row, Emit emit) {
    const int lane = threadIdx.x & 31;
    const unsigned lower = hc_lanemask_lt();
    const int bits = key_bits(wl);
#pragma unroll
    for (int c = 0; c < IPT; ++c) {
        const int k = window_key(key[c], e0, wl);
        if (__ballot_sync(HC_FULL_MASK, k >= 0) == 0) continue;  // no slot of this window in the chunk
        const unsigned peers = warp_peers(k, bits);
        const int leader = __ffs(peers) - 1;
        int start = 0;
        if (k >= 0 && lane == leader) {
            start = row[k];
            row[k] = start + __popc(peers);
        }
        start = __shfl_sync(HC_FULL_MASK, start, leader);
        if (k >= 0) emit(c, k, start + __popc(peers & lower));
        __syncwarp();
    }
}

// ---------------------------------------------------------------------------------------------------
// Block path (small inputs): `gridDim.x` independent blocks, no inter-block communication. EVERY block
// loads and maps ALL nk slots and counts them (so every block knows every expert's total and the slots of
// each expert before any point), but each block stores local_ids for, and places into `sorted`, only the
// slots it owns, and writes its share of the padding, block ids and fills. One block (grid 1) is the
// single-block kernel; with G blocks the placement (the serial part: one ranking round per 32-slot chunk)
// and the stores spread over G SMs, at the price of G reads of the ids from L2.
//
// Slots are cut into virtual warps of SUB chunks of 32 consecutive slots (virtual warp v owns slots
// [v * 32 * SUB, (v + 1) * 32 * SUB)); chunk c (< IPT) of physical warp w belongs to virtual warp
// w + active_warps * (c / SUB), so a block's warps hold every virtual warp, and the ones a block owns,
// [blockIdx.x * vpb, (blockIdx.x + 1) * vpb), sit on different physical warps: with vpb <= active_warps a
// warp ranks the SUB chunks of at most one virtual warp. SUB is IPT (one row per warp: the single-block
// kernel) or 1 (one row per chunk, for several blocks), a template constant so that every slot index is a
// multiply-add the compiler can redo instead of holding IPT of them in registers. cnt has one row per
// virtual warp, so a slot's position is
//   (group start) + (its expert's slots in lower virtual warps) + (in earlier chunks of its virtual warp)
//   + (in lower lanes of its chunk),
// i.e. slots of one expert in increasing slot order, whatever G and SUB are: the layout of the torch reference.
// Launch: block = max(32 * active_warps, window rounded up to warps) threads (<= HC_BLOCK_THREADS), every
// slot in some warp's IPT chunks (32 * IPT * active_warps >= nk), gridDim.x * vpb >= active_warps * IPT / SUB.
// Dynamic shared memory: [map: map_size if shared][cnt: rows * (window | 1)][gs: window + 1][tot: window]
// [scratch: HC_SCRATCH][keys: active_warps * IPT * 32], rows = active_warps * IPT / SUB (the row stride is
// odd so that a warp reading one expert's column across rows hits 32 different banks). The map comes first
// and there is no static shared memory, so that a faithful read at a negative index lands below the dynamic
// allocation, as in the upstream kernel.
// ---------------------------------------------------------------------------------------------------
template <typename IdT, int IPT, int SUB>
__global__ void __launch_bounds__(HC_BLOCK_THREADS, 1)
block_preprocess(const IdT* __restrict__ ids, int nk, const int* __restrict__ gmap, int map_size, int map_mode,
                 int faithful, int first, int num_local, int* __restrict__ local_ids, int* __restrict__ counts,
                 int* __restrict__ invalid, int* __restrict__ sorted, int* __restrict__ block_ids,
                 int* __restrict__ total_out, int block_m, int capacity, int window, int active_warps, int vpb) {
    static_assert(IPT % SUB == 0, "a virtual warp is a whole number of a thread's chunks");
    extern __shared__ int smem[];
    const int rows = active_warps * (IPT / SUB), stride = window | 1;
    int* smap = smem;
    int* cnt = smem + (map_mode == HC_MAP_SHARED ? map_size : 0);  // [rows][stride]
    int* gs = cnt + rows * stride;                                  // [window + 1]: absolute group starts, total
    int* tot = gs + window + 1;                                      // [window]: slots per expert of the window
    int* scratch = tot + window;                                     // [0, 33): scans; [33]: invalid count
    int* skey = scratch + HC_SCRATCH;                                // [active_warps * IPT * 32]: layout keys
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const bool lead = blockIdx.x == 0;                      // writes what every block computes alike
    const int gtid = blockIdx.x * blockDim.x + tid, gsize = gridDim.x * blockDim.x;
    // Chunk c of this warp: virtual warp warp + (c / SUB) * active_warps, slot
    // slot0 + (c / SUB) * vstride + (c % SUB) * 32.
    const int slot0 = warp * 32 * SUB + lane, vstride = active_warps * 32 * SUB;
    const bool holds = warp < active_warps;  // the warps past active_warps only help with per-expert work
    // This warp's chunk c is in a virtual warp this block owns, [blockIdx.x * vpb, (blockIdx.x + 1) * vpb),
    // iff c / SUB - q_lo is in [0, q_n).
    // (blockIdx.x is unsigned: keep the arithmetic signed; an empty batch has no active warp.)
    const int own_lo = (int)blockIdx.x * vpb, aw = max(active_warps, 1);
    const int q_lo = max(0, own_lo - warp + aw - 1) / aw;
    const int q_n = max(0, own_lo + vpb - warp + aw - 1) / aw - q_lo;
    int* key = skey + warp * IPT * 32 + lane;  // chunk c's key at key[c * 32]
    HC_MARK(0);

    // Issue the id loads first so that their latency overlaps the map copy.
    IdT raw[IPT];
#pragma unroll
    for (int c = 0; c < IPT; ++c) {
        const int i = slot0 + (c / SUB) * vstride + (c % SUB) * 32;
        raw[c] = holds && i < nk ? ids[i] : (IdT)0;
    }
    if (map_mode == HC_MAP_SHARED) hc_copy_map(smap, gmap, map_size);
    if (tid == 0) scratch[33] = 0;
    __syncthreads();
    HC_MARK(1);

    // Map every slot; local_ids only for the owned ones. The layout keys go to shared memory (-1: past nk or
    // not local), where the counting and ranking of every window read them: IPT keys held in registers
    // through the window loop made the IPT = 16 instantiations spill.
    int bad_here = 0;
    if (holds) {
#pragma unroll
        for (int c = 0; c < IPT; ++c) {
            const int i = slot0 + (c / SUB) * vstride + (c % SUB) * 32;
            int k = -1;
            if (i < nk) {
                int bad;
                const int local = map_one(raw[c], map_mode, faithful, smap, gmap, map_size, first, num_local, bad);
                if ((unsigned)(c / SUB - q_lo) < (unsigned)q_n) local_ids[i] = local;
                bad_here += bad;
                k = layout_key(local, num_local);
            }
            key[c * 32] = k;
        }
    }
    HC_MARK(2);
    bad_here = warp_sum(bad_here);
    if (lane == 0 && bad_here) atomicAdd(&scratch[33], bad_here);

    const bool aligned = block_m > 0;
    const unsigned lower = hc_lanemask_lt();
    int base = 0;  // padded entries of the windows done so far (the same in every thread)
    for (int e0 = 0; e0 < num_local; e0 += window) {
        const int wl = min(window, num_local - e0), bits = key_bits(wl);
        for (int j = tid; j < rows * stride; j += blockDim.x) cnt[j] = 0;
        __syncthreads();
        if (holds) {
#pragma unroll
            for (int c = 0; c < IPT; ++c) {
                const int k = window_key(key[c * 32], e0, wl);
                if (k >= 0) atomicAdd(&cnt[(warp + (c / SUB) * active_warps) * stride + k], 1);
            }
        }
        __syncthreads();
        HC_MARK(3);
        // Each row's exclusive prefix over lower rows, per expert, in place, and each expert's count. Few rows
        // (one block of a few warps: its warps each hold a row) take one thread per expert, which walks the rows;
        // many rows (several blocks: a row per 32-slot chunk) take one warp per expert: lane L sums rows
        // [L * R, (L + 1) * R) (independent loads) and a warp scan of the lanes' sums gives their offsets. R
        // and the row stride are odd, so the lanes' addresses L * R * stride + k fall in 32 different banks
        // (an even R of 16 made it a 16-way conflict: 12.8 us at 16K slots). The switch is block-uniform:
        // with one warp of 32 threads and 32 experts, one warp per expert took 32 scans in a row (18.9 us at
        // N*K = 8 on the block path, against 7.6-8.6 us for the thread per expert before).
        if (rows < 5 * ((wl + nwarps - 1) / nwarps)) {
            for (int k = tid; k < wl; k += blockDim.x) {
                int run = 0;
                for (int r = 0; r < rows; ++r) {
                    const int t = cnt[r * stride + k];
                    cnt[r * stride + k] = run;
                    run += t;
                }
                tot[k] = run;
                if (lead) counts[e0 + k] = run;
            }
        } else {
            const int R = ((rows + 31) >> 5) | 1, r0 = min(rows, lane * R), r1 = min(rows, r0 + R);
            for (int k = warp; k < wl; k += nwarps) {
                int sum = 0;
                for (int r = r0; r < r1; ++r) sum += cnt[r * stride + k];
                const int incl = warp_inclusive_scan(sum);
                int run = incl - sum;
                for (int r = r0; r < r1; ++r) {
                    const int t = cnt[r * stride + k];
                    cnt[r * stride + k] = run;
                    run += t;
                }
                if (lane == 31) {
                    tot[k] = incl;
                    if (lead) counts[e0 + k] = incl;
                }
            }
        }
        __syncthreads();
        HC_MARK(4);
        if (!aligned) continue;
        // Absolute padded group starts gs[0..wl] (gs[wl]: the end of the window's groups): an exclusive scan of
        // the padded counts. A window of <= 32 experts (the usual case) is one warp's shuffle scan, not a block
        // scan's three barriers; the same lanes then write their experts' padding entries and block ids from
        // registers (expert k by block k % gridDim.x), which the loops below do for larger windows with a
        // division per entry and a binary search per block.
        if (wl <= 32) {
            if (warp == 0) {
                const int t = lane < wl ? tot[lane] : 0;
                const int padded = lane < wl ? hc_round_up(t, block_m) : 0;
                const int incl = warp_inclusive_scan(padded);
                const int start = base + incl - padded;
                if (lane < wl) gs[lane] = start;
                if (lane == 31) gs[wl] = base + incl;  // lanes past wl add 0: lane 31 holds the window's total
                if (lane < wl && lane % (int)gridDim.x == (int)blockIdx.x) {
                    for (int q = start + t; q < start + padded; ++q) sorted[q] = nk;  // < block_m entries
                    for (int b = start / block_m, b1 = (start + padded) / block_m; b < b1; ++b)
                        block_ids[b] = e0 + lane;
                }
            }
        } else {
            for (int k = tid; k < wl; k += blockDim.x) gs[k] = hc_round_up(tot[k], block_m);
            __syncthreads();
            const int window_total = block_exclusive_scan(gs, wl, scratch);
            for (int k = tid; k < wl; k += blockDim.x) gs[k] += base;
            if (tid == 0) gs[wl] = base + window_total;
        }
        __syncthreads();
        const int window_total = gs[wl] - base;
        HC_MARK(5);
        // Owned chunks: rank and place (the leader of each group of equal keys reads and advances its
        // virtual warp's row; __syncwarp orders one chunk's update before the next chunk's read).
        if (holds) {
#pragma unroll
            for (int c = 0; c < IPT; ++c) {
                if ((unsigned)(c / SUB - q_lo) >= (unsigned)q_n) continue;  // warp-uniform
                const int k = window_key(key[c * 32], e0, wl);
                const unsigned valid = __ballot_sync(HC_FULL_MASK, k >= 0);
                if (valid == 0) continue;
                const unsigned peers = warp_peers_of(valid, k, bits);
                const int leader = __ffs(peers) - 1;
                int* row = cnt + (warp + (c / SUB) * active_warps) * stride;
                int start = 0;
                if (k >= 0 && lane == leader) {
                    start = row[k];
                    row[k] = start + __popc(peers);
                }
                start = __shfl_sync(HC_FULL_MASK, start, leader);
                if (k >= 0)
                    sorted[gs[k] + start + __popc(peers & lower)] =
                        slot0 + (c / SUB) * vstride + (c % SUB) * 32;
                __syncwarp();
            }
        }
        HC_MARK(6);
        if (wl > 32) {  // this block's share of the padding entries (< block_m per group) and of the block ids
            for (int j = gtid; j < wl * block_m; j += gsize) {
                const int k = j / block_m, r = j - k * block_m;
                if (r < gs[k + 1] - gs[k] - tot[k]) sorted[gs[k] + tot[k] + r] = nk;  // gs[k + 1] - gs[k]: padded
            }
            HC_MARK(7);
            for (int b = gs[0] / block_m + gtid; b < gs[wl] / block_m; b += gsize)
                block_ids[b] = e0 + upper_bound(gs, wl + 1, b * block_m) - 1;
        }
        HC_MARK(8);
        base += window_total;
        __syncthreads();  // cnt, gs and tot are rewritten by the next window
        HC_MARK(9);
    }
    if (aligned) {
        hc_fill(sorted, base, capacity, nk, gtid, gsize);
        HC_MARK(10);
        hc_fill(block_ids, base / block_m, capacity / block_m, -1, gtid, gsize);
        if (lead && tid == 0) total_out[0] = base;
    }
    HC_MARK(11);
    __syncthreads();  // every warp's atomicAdd on scratch[33] is done
    if (lead && tid == 0) invalid[0] = scratch[33];
    HC_MARK(12);
}

// ---------------------------------------------------------------------------------------------------
// Warp path (decode sizes): ONE warp, SPL slots per lane (nk <= 32 * SPL), num_local <= HC_WARP_MAX_LOCAL.
// Same contract and outputs as block_preprocess. Why a separate kernel (audit in GPU_RESULTS.md): at
// N*K <= 512 block_preprocess spends its time on block-level machinery, not on memory: 6+ __syncthreads,
// a 3-barrier block scan per window, a serial per-expert loop over per-warp counters, a binary search per
// block id, shared-memory atomics for the invalid count. Here every step is a warp instruction or one pass
// of independent shared-memory accesses, fenced by __syncwarp only:
//   1. issue all id loads (and, for a shared map, the map copy) at once: ONE dependent memory round trip
//      (two with the map in global memory: ids, then each slot's map entry, read directly);
//   2. per 32-slot chunk c (independent across chunks): key, peers from bits+1 ballots, rank in the chunk;
//      the group leader stores the chunk's count of its key to ccnt[c][key] (plain stores, one writer);
//   0. (with the loads in flight) every entry of `sorted` is set to nk with 16-byte stores over all lanes:
//      padding and tail need no other store; slot entries are overwritten in step 4 (__syncwarp orders it);
//   3. lane L owns experts [L*EPL, (L+1)*EPL): exclusive prefix of ccnt over chunks (independent loads),
//      counts, padded sizes; warp shuffle scan -> padded group starts; block ids and counts stored;
//   4. every slot's position = group start + ccnt[c][key] + rank in chunk: sorted written, no atomics;
//      the tail of block_ids past the total with 16-byte stores over all lanes.
// The invalid count is a ballot popcount summed in registers and stored once (no atomic, no read).
// Dynamic shared memory: [map: map_size if shared][ccnt: SPL * num_local][gs: num_local] (map first:
// faithful negative reads land below the allocation, as in block_preprocess).
// ---------------------------------------------------------------------------------------------------
#define HC_WARP_MAX_LOCAL 256  // 8 experts per lane: every expert of a 256-expert model local (128 until run 103)

// The first step of the one-warp kernels: this lane's SPL ids (slot c * 32 + lane; 0 past nk) into `raw`,
// the map into shared memory (map_mode HC_MAP_SHARED), and, with the loads in flight, every entry of
// `sorted` set to nk (16-byte stores over the 32 lanes): the padding entries and the tail past the total keep
// it, the slot entries are overwritten later, after a __syncwarp that orders this warp's global stores. (It
// replaces a serial loop of up to block_m - 1 padding stores per expert per lane and a separate tail fill;
// the <= 512 slots of the one-warp kernels are cheap to write twice.) The caller's __syncwarp publishes the map.
template <typename IdT, int SPL>
__device__ __forceinline__ void warp_start(IdT (&raw)[SPL], const IdT* __restrict__ ids, int nk, int* smap,
                                           const int* __restrict__ gmap, int map_size, int map_mode,
                                           int* __restrict__ sorted, int block_m, int capacity) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < SPL; ++c) {
        const int i = c * 32 + lane;
        raw[c] = i < nk ? ids[i] : (IdT)0;
    }
    if (map_mode == HC_MAP_SHARED) hc_copy_map(smap, gmap, map_size);
    if (block_m > 0) hc_fill_warp(sorted, 0, capacity, nk);
}

template <typename IdT, int SPL>
__global__ void __launch_bounds__(32)
warp_preprocess(const IdT* __restrict__ ids, int nk, const int* __restrict__ gmap, int map_size, int map_mode,
                int faithful, int first, int num_local, int* __restrict__ local_ids, int* __restrict__ counts,
                int* __restrict__ invalid, int* __restrict__ sorted, int* __restrict__ block_ids,
                int* __restrict__ total_out, int block_m, int capacity) {
    extern __shared__ int smem[];
    int* smap = smem;
    int* ccnt = smem + (map_mode == HC_MAP_SHARED ? map_size : 0);  // [SPL][num_local]
    int* gs = ccnt + SPL * num_local;                                // [num_local]: padded group starts
    const int lane = threadIdx.x & 31;
    const unsigned lower = hc_lanemask_lt();
    HC_MARK(0);

    IdT raw[SPL];
    warp_start(raw, ids, nk, smap, gmap, map_size, map_mode, sorted, block_m, capacity);
    // Zero the chunk counters while the loads are in flight (keys absent from a chunk must read 0).
    for (int j = lane; j < SPL * num_local; j += 32) ccnt[j] = 0;
    __syncwarp();  // the map copy and the zeros are visible to the whole warp
    HC_MARK(1);

    const int bits = key_bits(num_local);
    int key[SPL], rank[SPL];
    int bad_total = 0;
#pragma unroll
    for (int c = 0; c < SPL; ++c) {
        int bad;
        const int k = map_slot(raw[c], c * 32 + lane, nk, map_mode, faithful, smap, gmap, map_size, first, num_local,
                               local_ids, bad);
        bad_total += __popc(__ballot_sync(HC_FULL_MASK, bad));
        const unsigned peers = warp_peers(k, bits);
        key[c] = k;
        rank[c] = __popc(peers & lower);
        // The lowest lane of each group of equal keys stores the chunk's count of that key: one writer per
        // (chunk, key), plain stores, nothing waits on them until the __syncwarp below.
        if (k >= 0 && rank[c] == 0) ccnt[c * num_local + k] = __popc(peers);
    }
    if (lane == 0) invalid[0] = bad_total;  // the same value in every lane: no atomic, no read of the counter
    __syncwarp();  // chunk counts visible
    HC_MARK(2);

    // Lane L owns experts [k0, k1) (in lane order, so a warp scan of the lanes' sums orders the groups):
    // exclusive prefix of each owned expert's chunk counts (SPL independent shared loads), its total and
    // its number of blocks. Group sizes are counted in blocks, so the one integer division per owned
    // expert is the ceiling of its count (starts, ends and the total are then products, not quotients).
    const int epl = (num_local + 31) >> 5;  // <= HC_WARP_MAX_LOCAL / 32
    const int k0 = min(lane * epl, num_local), k1 = min(k0 + epl, num_local);
    const bool aligned = block_m > 0;
    int nblocks[HC_WARP_MAX_LOCAL / 32];
    int blocks_mine = 0;
#pragma unroll
    for (int j = 0; j < HC_WARP_MAX_LOCAL / 32; ++j) {
        const int k = k0 + j;
        nblocks[j] = 0;
        if (k >= k1) continue;
        int v[SPL];
#pragma unroll
        for (int c = 0; c < SPL; ++c) v[c] = ccnt[c * num_local + k];
        int run = 0;
#pragma unroll
        for (int c = 0; c < SPL; ++c) {
            ccnt[c * num_local + k] = run;  // this expert's slots in earlier chunks (same lane reads it back)
            run += v[c];
        }
        counts[k] = run;
        if (aligned) nblocks[j] = (run + block_m - 1) / block_m;
        blocks_mine += nblocks[j];
    }
    if (!aligned) return;  // counts, local_ids and the invalid count are all there is without a layout
    const int incl = warp_inclusive_scan(blocks_mine);
    const int total_blocks = __shfl_sync(HC_FULL_MASK, incl, 31);
    HC_MARK(3);
    // Group starts and the block ids of each owned expert (stores only; the padding is already nk).
    int b = incl - blocks_mine;  // first block of this lane's first expert
#pragma unroll
    for (int j = 0; j < HC_WARP_MAX_LOCAL / 32; ++j) {
        const int k = k0 + j;
        if (k >= k1) continue;
        gs[k] = b * block_m;
        for (int q = 0; q < nblocks[j]; ++q) block_ids[b + q] = k;
        b += nblocks[j];
    }
    __syncwarp();  // group starts and chunk prefixes visible to every lane
    HC_MARK(4);
#pragma unroll
    for (int c = 0; c < SPL; ++c)
        if (key[c] >= 0) sorted[gs[key[c]] + ccnt[c * num_local + key[c]] + rank[c]] = c * 32 + lane;
    hc_fill_warp(block_ids, total_blocks, capacity / block_m, -1);
    if (lane == 0) total_out[0] = total_blocks * block_m;
    HC_MARK(5);
}

// ---------------------------------------------------------------------------------------------------
// Lane path (the smallest decode batches): ONE warp, num_local <= 32 * EPL (EPL <= 2 experts per lane),
// nk <= 32 * SPL (SPL <= 4). Lane e owns local experts e and e + 32, so every count and position comes from
// ballots held in registers: no shared counters to zero, fill or read back, and a single __syncwarp (for
// the shared map). Same contract, same arguments and same outputs as warp_preprocess. Why (GPU_RESULTS.md,
// runs 13-15): warp_preprocess at N*K = 8 ran 513 dependent warp instructions at ~10 cycles each; the time is
// that chain, not memory.
//
// Per chunk c of 32 slots, 1 + bits ballots describe every key at once (ChunkKeys, bits = 5 for 32 experts,
// 6 for 64): valid (the lanes with a local key) and bit[b] (the lanes whose key has bit b set). The lanes
// whose key is e are then
//   valid & AND_b (bit b of e ? bit[b] : ~bit[b]),
// which every lane can evaluate for ANY e: for its own key (its peers, hence its rank in the chunk) and for
// its own expert (that expert's count in the chunk). Positions keep the stable order of the torch reference:
//   (group start of k) + (slots of k in earlier chunks) + (lanes of k below this one in the chunk),
// where lane k % 32 holds the first two terms for every chunk and one shuffle per slot (per expert of a lane)
// fetches them.
// It starts like warp_preprocess (warp_start: loads, map copy, `sorted` set to nk); the __syncwarp after it
// orders those stores before the slot stores that overwrite some of them.
// Dynamic shared memory: [map: map_size if shared] (faithful negative reads land below it, as elsewhere).
// ---------------------------------------------------------------------------------------------------
#define HC_LANE_MAX_EPL 2  // local experts per lane in the lane kernels: at most 64 local experts

// Key bits of the lane kernels with EPL experts per lane (keys 0 .. 32 * EPL - 1).
__host__ __device__ constexpr int lane_key_bits(int epl) { return epl == 1 ? 5 : 6; }

// The keys of a 32-slot chunk as 1 + BITS ballots: the lanes with a local key, and per bit b < BITS the lanes
// whose key has bit b set.
struct ChunkKeys {
    unsigned valid;
    unsigned bit[lane_key_bits(HC_LANE_MAX_EPL)];
};

template <int BITS>
__device__ __forceinline__ ChunkKeys chunk_keys(int k) {
    ChunkKeys ck;
    ck.valid = __ballot_sync(HC_FULL_MASK, k >= 0);
#pragma unroll
    for (int b = 0; b < BITS; ++b) ck.bit[b] = __ballot_sync(HC_FULL_MASK, k & (1 << b));
    return ck;
}

// Lanes of the chunk whose key is e (0 <= e < 2^BITS): one AND-XOR per bit (bit b of e clear: the complement).
template <int BITS>
__device__ __forceinline__ unsigned lanes_with_key(const ChunkKeys& ck, int e) {
    unsigned m = ck.valid;
#pragma unroll
    for (int b = 0; b < BITS; ++b) m &= ck.bit[b] ^ (((unsigned)e >> b & 1u) - 1u);
    return m;
}

// The value held for expert k (< 32 * EPL): every lane holds lanes[j] for its experts lane + 32 j, so this is
// lanes[k / 32] of lane k % 32 (one shuffle per j; the one for k's j is kept).
template <int EPL>
__device__ __forceinline__ int from_expert_lane(const int (&lanes)[EPL], int k) {
    int v = __shfl_sync(HC_FULL_MASK, lanes[0], k & 31);
#pragma unroll
    for (int j = 1; j < EPL; ++j) {
        const int vj = __shfl_sync(HC_FULL_MASK, lanes[j], k & 31);
        if (k >> 5 == j) v = vj;
    }
    return v;
}

// The aligned layout's groups, in expert order, for the experts lane + 32 j with count[j] slots each (all lanes
// call it): nblocks[j] = the group's blocks (block_m entries each), first_block[j] = its first block; returns
// the blocks of all groups. Warp scans chained over j: experts 0-31, then 32-63.
template <int EPL>
__device__ __forceinline__ int lane_first_blocks(const int (&count)[EPL], int block_m, int (&nblocks)[EPL],
                                                 int (&first_block)[EPL]) {
    int total_blocks = 0;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
        nblocks[j] = (count[j] + block_m - 1) / block_m;
        const int incl = warp_inclusive_scan(nblocks[j]);
        first_block[j] = total_blocks + incl - nblocks[j];
        total_blocks += __shfl_sync(HC_FULL_MASK, incl, 31);
    }
    return total_blocks;
}

template <typename IdT, int SPL, int EPL>
__global__ void __launch_bounds__(32)
lane_preprocess(const IdT* __restrict__ ids, int nk, const int* __restrict__ gmap, int map_size, int map_mode,
                int faithful, int first, int num_local, int* __restrict__ local_ids, int* __restrict__ counts,
                int* __restrict__ invalid, int* __restrict__ sorted, int* __restrict__ block_ids,
                int* __restrict__ total_out, int block_m, int capacity) {
    extern __shared__ int smem[];
    const int lane = threadIdx.x & 31;
    HC_MARK(0);

    IdT raw[SPL];
    warp_start(raw, ids, nk, smem, gmap, map_size, map_mode, sorted, block_m, capacity);
    __syncwarp();  // the map copy is visible to the whole warp; the fill is ordered before the slot stores
    HC_MARK(1);

    constexpr int BITS = lane_key_bits(EPL);
    int key[SPL];
    ChunkKeys ck[SPL];
    int bad_total = 0;
#pragma unroll
    for (int c = 0; c < SPL; ++c) {
        int bad;
        const int k = map_slot(raw[c], c * 32 + lane, nk, map_mode, faithful, smem, gmap, map_size, first, num_local,
                               local_ids, bad);
        key[c] = k;
        bad_total += __popc(__ballot_sync(HC_FULL_MASK, bad));
        ck[c] = chunk_keys<BITS>(k);
    }
    if (lane == 0) invalid[0] = bad_total;  // the same value in every lane: no atomic, no read of the counter

    // This lane's experts lane + 32 j: their slots before each chunk, and their totals.
    int before[EPL][SPL];
    int count[EPL];
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
        count[j] = 0;
#pragma unroll
        for (int c = 0; c < SPL; ++c) {
            before[j][c] = count[j];
            count[j] += __popc(lanes_with_key<BITS>(ck[c], lane + 32 * j));
        }
        if (lane + 32 * j < num_local) counts[lane + 32 * j] = count[j];
    }
    if (block_m <= 0) return;  // counts, local_ids and the invalid count are all there is without a layout
    HC_MARK(2);

    // The groups' first blocks, and the block ids of this lane's experts.
    int nblocks[EPL], first_block[EPL];
    const int total_blocks = lane_first_blocks<EPL>(count, block_m, nblocks, first_block);
#pragma unroll
    for (int j = 0; j < EPL; ++j)
        for (int q = 0; q < nblocks[j]; ++q) block_ids[first_block[j] + q] = lane + 32 * j;
    HC_MARK(3);
#pragma unroll
    for (int c = 0; c < SPL; ++c) {
        const int k = key[c];
        int start[EPL];  // the position of this lane's experts' first slot in chunk c
#pragma unroll
        for (int j = 0; j < EPL; ++j) start[j] = first_block[j] * block_m + before[j][c];
        const int base = from_expert_lane<EPL>(start, k);
        if (k >= 0) sorted[base + __popc(lanes_with_key<BITS>(ck[c], k) & hc_lanemask_lt())] = c * 32 + lane;
    }
    hc_fill_warp(block_ids, total_blocks, capacity / block_m, -1);
    if (lane == 0) total_out[0] = total_blocks * block_m;
    HC_MARK(4);
}

// ---------------------------------------------------------------------------------------------------
// Block path for <= 32 * EPL local experts: block_lane_preprocess, up to 32 warps whose lane e stands for
// experts e and e + 32 (EPL = 2).
// Same contract and outputs as block_preprocess; gridDim.x independent blocks, no inter-block communication.
// Warp w owns the IPT consecutive 32-slot chunks [w * 32 * IPT, (w + 1) * 32 * IPT) and lane e of every warp
// stands for local experts e + 32 j, j < EPL. Every block maps and counts ALL slots; block b stores local_ids
// for, and places, the slots of warps [b * owned_warps, (b + 1) * owned_warps) only. Steps:
//   1. every warp loads its ids (all IPT loads in flight) while the block copies the map; barrier;
//   2. per chunk: map (the map mode a template constant) and count each local slot on the warp's own row
//      wpos[w][key] (shared atomics: a row per warp); barrier;
//   3. warp 0, lane e, for each of its experts x = e + 32 j: exclusive prefix of column x over the warps
//      (independent loads, then adds), expert x's blocks, a warp scan for the group starts (chained over j);
//      wpos[w][x] becomes the position of warp w's first slot of expert x; barrier;
//   4. warp e of the grid writes expert e's padding entries and block ids (all lanes; on a grid of fewer
//      warps than experts lane e % 32 of warp 0 of block e % gridDim.x does, alone), the grid the tails
//      past the total (16-byte stores), and the owned warps place their slots: wpos[w][k] + (in earlier
//      chunks) + (in lower lanes), the torch reference's stable order. Every entry of `sorted` is written
//      exactly once.
// (A first version let every warp sum its whole column after step 2, saving two barriers: at 32 warps those
// 32 x 32 shared loads took 1.6 us, GPU run 26 in GPU_RESULTS.md.)
// Dynamic shared memory: [map: map_size if shared][wpos: 32 * EPL * warps][tot: 32 * EPL][fblk: 32 * EPL + 1]
// [wbad: warps]
// (map first: faithful negative reads land below the allocation, as in the other kernels).
// ---------------------------------------------------------------------------------------------------

// Step 2 for this warp's chunks: keys into `key`, local ids stored when `local_ids` is not null, the ids that
// break the sentinel contract added to `bad_warp` (warp-uniform), +1 per local slot on row[key] (the warp's own
// zeroed row: shared atomics, one instruction per chunk; the ballots of lanes_with_key took ~25).
template <typename IdT, int IPT, int MODE, int FAITHFUL>
__device__ __forceinline__ void lane_count_chunks(const IdT (&raw)[IPT], int seg, int nk, const int* smap,
                                                  const int* __restrict__ gmap, int map_size, int first,
                                                  int num_local, int* __restrict__ local_ids, int (&key)[IPT],
                                                  int* row, int& bad_warp) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < IPT; ++c) {
        int bad;
        key[c] = map_slot(raw[c], seg + c * 32 + lane, nk, MODE, FAITHFUL, smap, gmap, map_size, first, num_local,
                          local_ids, bad);
        bad_warp += __popc(__ballot_sync(HC_FULL_MASK, bad));
        if (key[c] >= 0) atomicAdd(row + key[c], 1);
    }
}

// The layout entries that no slot decides, for the lane block kernels (every thread of the grid calls it; tot and
// fblk as step 3 of block_lane_preprocess leaves them): expert e's padding entries and block ids by warp e of the
// grid, its lanes over the entries (on a grid of fewer warps than experts, lane e % 32 of warp 0 of block
// e % gridDim.x, alone: one warp looping over 32 experts took 1.6 us, GPU run 30); the tails of `sorted` and
// block_ids past the total by the whole grid (16-byte stores); the total by thread 0 of the grid.
template <int EPL>
__device__ __forceinline__ void lane_layout_writes(const int* tot, const int* fblk, int num_local, int block_m, int nk,
                                                   int capacity, int* __restrict__ sorted, int* __restrict__ block_ids,
                                                   int* __restrict__ total_out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int total_blocks = fblk[32 * EPL];
    if ((int)gridDim.x * nwarps >= num_local) {
        const int e = blockIdx.x * nwarps + warp;
        if (e < num_local) {
            const int b0 = fblk[e], b1 = fblk[e + 1];
            for (int p = b0 * block_m + tot[e] + lane; p < b1 * block_m; p += 32) sorted[p] = nk;
            for (int q = b0 + lane; q < b1; q += 32) block_ids[q] = e;
        }
    } else if (warp == 0) {
#pragma unroll
        for (int j = 0; j < EPL; ++j) {
            const int e = lane + 32 * j;
            if (e < num_local && e % (int)gridDim.x == (int)blockIdx.x) {
                const int b0 = fblk[e], b1 = fblk[e + 1];
                for (int p = b0 * block_m + tot[e]; p < b1 * block_m; ++p) sorted[p] = nk;
                for (int q = b0; q < b1; ++q) block_ids[q] = e;
            }
        }
    }
    const int gtid = blockIdx.x * blockDim.x + threadIdx.x, gsize = gridDim.x * blockDim.x;
    hc_fill(sorted, total_blocks * block_m, capacity, nk, gtid, gsize);
    hc_fill(block_ids, total_blocks, capacity / block_m, -1, gtid, gsize);
    if (gtid == 0) total_out[0] = total_blocks * block_m;
}

// The lane block kernels' placement of one warp's IPT chunks (slot seg + c * 32 + lane has key key[c], -1 if not
// local): next[j] is the position of the warp's next slot of expert lane + 32 j. A slot goes to its expert's next
// position plus the same key's lanes below it in the chunk: the torch reference's stable order.
template <int IPT, int EPL>
__device__ __forceinline__ void lane_place_chunks(const int (&key)[IPT], int (&next)[EPL], int seg,
                                                  int* __restrict__ sorted) {
    constexpr int BITS = lane_key_bits(EPL);
    const int lane = threadIdx.x & 31;
    const unsigned lower = hc_lanemask_lt();
#pragma unroll
    for (int c = 0; c < IPT; ++c) {
        const int k = key[c];
        const ChunkKeys ck = chunk_keys<BITS>(k);
        const int base = from_expert_lane<EPL>(next, k);
        if (k >= 0) sorted[base + __popc(lanes_with_key<BITS>(ck, k) & lower)] = seg + c * 32 + lane;
#pragma unroll
        for (int j = 0; j < EPL; ++j) next[j] += __popc(lanes_with_key<BITS>(ck, lane + 32 * j));
    }
}

// Step 1 of the lane block kernels (every thread calls it; the caller's __syncthreads publishes the shared
// stores): this lane's IPT ids (slot seg + c * 32 + lane, 0 past nk) into `raw`, all loads in flight at once; the
// map into shared memory (map_mode HC_MAP_SHARED); the warp's row of 32 * EPL counters (wpos[row..]) zeroed.
template <typename IdT, int IPT, int EPL>
__device__ __forceinline__ void lane_block_start(IdT (&raw)[IPT], const IdT* __restrict__ ids, int seg, int nk,
                                                 int* smap, const int* __restrict__ gmap, int map_size, int map_mode,
                                                 int* wpos, int row) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < IPT; ++c) {
        const int i = seg + c * 32 + lane;
        raw[c] = i < nk ? ids[i] : (IdT)0;
    }
    if (map_mode == HC_MAP_SHARED) hc_copy_map(smap, gmap, map_size);
#pragma unroll
    for (int j = 0; j < EPL; ++j) wpos[row + lane + 32 * j] = 0;
}

// lane_count_chunks with the map mode and faithful flag turned into template constants (a runtime mode in the
// per-chunk code cost ~95 SASS instructions per chunk, GPU run 27).
template <typename IdT, int IPT>
__device__ __forceinline__ void lane_count(const IdT (&raw)[IPT], int seg, int nk, int map_mode, int faithful,
                                           const int* smap, const int* __restrict__ gmap, int map_size, int first,
                                           int num_local, int* __restrict__ local_ids, int (&key)[IPT], int* row,
                                           int& bad_warp) {
#define HC_LANE_COUNT(MODE, FAITHFUL)                                                                             \
    lane_count_chunks<IdT, IPT, MODE, FAITHFUL>(raw, seg, nk, smap, gmap, map_size, first, num_local, local_ids, key, \
                                                row, bad_warp)
    if (map_mode == HC_MAP_SHARED) faithful ? HC_LANE_COUNT(HC_MAP_SHARED, 1) : HC_LANE_COUNT(HC_MAP_SHARED, 0);
    else if (map_mode == HC_MAP_GLOBAL) faithful ? HC_LANE_COUNT(HC_MAP_GLOBAL, 1) : HC_LANE_COUNT(HC_MAP_GLOBAL, 0);
    else HC_LANE_COUNT(HC_MAP_NONE, 0);
#undef HC_LANE_COUNT
}

// Warp 0 of a lane block kernel: total[j] = expert (lane + 32 j)'s slots in this block, the sum of its column of
// the warps' count rows (wpos[w][x], rows of 32 * EPL).
template <int EPL>
__device__ __forceinline__ void lane_column_totals(const int* wpos, int nwarps, int (&total)[EPL]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
        total[j] = 0;
#pragma unroll 8
        for (int r = 0; r < nwarps; ++r) total[j] += wpos[r * 32 * EPL + lane + 32 * j];
    }
}

// Warp 0 of a lane block kernel: expert x = lane + 32 j's column of the warps' count rows becomes each warp's
// first position of x: start[j] plus the slots of x in lower warps; end[j] = start[j] + the column's sum.
template <int EPL>
__device__ __forceinline__ void lane_column_positions(int* wpos, int nwarps, const int (&start)[EPL], int (&end)[EPL]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
        int run = start[j];
#pragma unroll 8
        for (int r = 0; r < nwarps; ++r) {
            int* at = wpos + r * 32 * EPL + lane + 32 * j;
            const int c = *at;
            *at = run;
            run += c;
        }
        end[j] = run;
    }
}

// Warp 0 of a lane block kernel, with a layout: from total[j], expert (lane + 32 j)'s slots in the whole batch, the
// groups: group[j] = the group's start in `sorted`; tot / fblk get the experts' totals and first blocks,
// fblk[32 * EPL] the total of blocks.
template <int EPL>
__device__ __forceinline__ void lane_groups(const int (&total)[EPL], int block_m, int* tot, int* fblk, int (&group)[EPL]) {
    const int lane = threadIdx.x & 31;
    int nblocks[EPL], first_block[EPL];
    const int total_blocks = lane_first_blocks<EPL>(total, block_m, nblocks, first_block);
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
        group[j] = first_block[j] * block_m;
        tot[lane + 32 * j] = total[j];
        fblk[lane + 32 * j] = first_block[j];
    }
    if (lane == 0) fblk[32 * EPL] = total_blocks;
}

template <typename IdT, int IPT, int EPL>
__global__ void __launch_bounds__(HC_BLOCK_THREADS, 1)
block_lane_preprocess(const IdT* __restrict__ ids, int nk, const int* __restrict__ gmap, int map_size, int map_mode,
                      int faithful, int first, int num_local, int* __restrict__ local_ids, int* __restrict__ counts,
                      int* __restrict__ invalid, int* __restrict__ sorted, int* __restrict__ block_ids,
                      int* __restrict__ total_out, int block_m, int capacity, int owned_warps) {
    extern __shared__ int smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int* smap = smem;
    constexpr int EW = 32 * EPL;                                     // experts per row
    int* wpos = smem + (map_mode == HC_MAP_SHARED ? map_size : 0);  // [nwarps][EW]
    int* tot = wpos + nwarps * EW;                                   // [EW]: slots per expert
    int* fblk = tot + EW;                                            // [EW + 1]: first block per expert, total
    int* wbad = fblk + EW + 1;                                       // [nwarps]
    const bool owner = warp >= (int)blockIdx.x * owned_warps && warp < ((int)blockIdx.x + 1) * owned_warps;
    const int seg = warp * 32 * IPT;
    HC_MARK(0);

    IdT raw[IPT];
    lane_block_start<IdT, IPT, EPL>(raw, ids, seg, nk, smap, gmap, map_size, map_mode, wpos, warp * EW);
    __syncthreads();  // the map copy, the zero rows
    HC_MARK(1);

    int key[IPT];
    int bad_warp = 0;
    lane_count<IdT, IPT>(raw, seg, nk, map_mode, faithful, smap, gmap, map_size, first, num_local,
                         owner ? local_ids : nullptr, key, wpos + warp * EW, bad_warp);
    if (lane == 0) wbad[warp] = bad_warp;
    __syncthreads();  // every warp's counts
    HC_MARK(2);

    const bool aligned = block_m > 0;
    if (warp == 0) {
        if (blockIdx.x == 0) {
            const int bad = warp_sum(lane < nwarps ? wbad[lane] : 0);
            if (lane == 0) invalid[0] = bad;
        }
        int total[EPL];  // column x = lane + 32 j (expert x's slots per warp) is read twice: a total, then the prefixes
        lane_column_totals<EPL>(wpos, nwarps, total);
#pragma unroll
        for (int j = 0; j < EPL; ++j)
            if (blockIdx.x == 0 && lane + 32 * j < num_local) counts[lane + 32 * j] = total[j];
        if (aligned) {
            int group[EPL], end[EPL];
            lane_groups<EPL>(total, block_m, tot, fblk, group);
            lane_column_positions<EPL>(wpos, nwarps, group, end);
        }
    }
    if (!aligned) return;  // counts, local_ids and the invalid count are all there is without a layout
    __syncthreads();  // positions, totals, first blocks
    HC_MARK(3);

    lane_layout_writes<EPL>(tot, fblk, num_local, block_m, nk, capacity, sorted, block_ids, total_out);
    if (!owner) return;
    int next[EPL];  // experts lane + 32 j: position of this warp's next slot
#pragma unroll
    for (int j = 0; j < EPL; ++j) next[j] = wpos[warp * EW + lane + 32 * j];
    lane_place_chunks<IPT, EPL>(key, next, seg, sorted);
    HC_MARK(4);
}

// ---------------------------------------------------------------------------------------------------
// Cluster path (sm_90+) for <= 32 * EPL local experts: cluster_lane_preprocess, ONE thread-block cluster of
// CB blocks (8 or 16) that split the slots between them, where block_lane_preprocess's blocks each map and
// count all of them (at 16K slots its 16 blocks spent 2.5 of 7 us counting, the ids' loads 1.3 us more, and each
// owned warp placed 16 chunks in a row: GPU run 31). Block r owns the slots [r * S, (r + 1) * S), S = blockDim.x
// * IPT, and its warp w the IPT chunks of 32 from r * S + w * 32 * IPT. The blocks exchange their totals through
// distributed shared memory: no global workspace, no grid barrier. Same contract and outputs as the other kernels.
//   1. every warp loads its ids while the block copies the map; barrier;
//   2. map, store local_ids, count each local slot on the warp's own row (lane_count); barrier;
//   3. warp 0: each warp's count row becomes its first position of every expert within the block (column prefix
//      sums, lane_column_positions); the block's slots per expert (the column sums) and invalid count are stored as
//      row `rank` of `peers` in EVERY block of the cluster (asynchronous remote stores, counted on the receiver's
//      mbarrier); warp 0 waits until its own block has received all CB rows;
//   4. warp 0, lane e, for experts x = e + 32 j: from its own `peers`, x's total and its slots in lower blocks, then
//      the group starts (lane_groups): `start[x]` = x's group start + its slots in lower blocks; block 0 stores
//      counts and the invalid count; barrier;
//   5. as block_lane_preprocess's step 4 (lane_layout_writes, lane_place_chunks), every warp placing its own
//      chunks from start[x] + its row.
// (The in-block prefix rides on the column sums that step 3 needs anyway; in block_lane_preprocess it comes after
// the group starts, on the step that every warp waits for.)
// One cluster barrier, arrived at once the mbarrier is initialised and waited for before the first remote store
// (no block may store into an uninitialised mbarrier): its latency hides behind steps 1-2. A block's shared memory
// is written by the others only before its own wait in step 3 ends, so blocks exit without waiting for each
// other. (GPU runs 46-47, GPU_RESULTS.md: the first version read the peers' rows after a cluster barrier and
// waited at a second one before exiting, 1.0-1.2 us for that step; pushing them with plain stores before a
// release arrive cost a MEMBAR.ALL.GPU behind the warp's local_ids stores.)
// Dynamic shared memory: [map: map_size if shared][wpos: 32 * EPL * warps][tot: 32 * EPL][fblk: 32 * EPL + 1]
// [wbad: warps][start: 32 * EPL][up to 3 unused ints][peers: CB rows of 32 * EPL + 4, 16-byte aligned][the
// mbarrier: 8 bytes] (map first: faithful negative reads land below the allocation).
// ---------------------------------------------------------------------------------------------------
template <typename IdT, int IPT, int EPL, int CB>
__global__ void HC_CLUSTER_DIMS(CB) __launch_bounds__(HC_BLOCK_THREADS, 1)
cluster_lane_preprocess(const IdT* __restrict__ ids, int nk, const int* __restrict__ gmap, int map_size, int map_mode,
                        int faithful, int first, int num_local, int* __restrict__ local_ids, int* __restrict__ counts,
                        int* __restrict__ invalid, int* __restrict__ sorted, int* __restrict__ block_ids,
                        int* __restrict__ total_out, int block_m, int capacity) {
    extern __shared__ int smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    constexpr int EW = 32 * EPL;                                     // experts per row
    constexpr int RW = EW + 4;  // a row of `peers`: EW counts, the invalid count, 3 unused words (16-byte pieces)
    int* smap = smem;
    int* wpos = smem + (map_mode == HC_MAP_SHARED ? map_size : 0);  // [nwarps][EW]
    int* tot = wpos + nwarps * EW;                                   // [EW]: slots per expert
    int* fblk = tot + EW;                                            // [EW + 1]: first block per expert, total
    int* wbad = fblk + EW + 1;                                       // [nwarps]
    int* start = wbad + nwarps;  // [EW]: expert x's first position in `sorted` for this block's slots
    // [CB][RW], 16-byte aligned (the dynamic shared memory starts 16-byte aligned): block r's row
    int* peers = smem + ((start + EW - smem + 3) & ~3);
    auto* mbar = reinterpret_cast<unsigned long long*>(peers + CB * RW);  // the rows arrive on it (8-byte aligned)
    const int rank = blockIdx.x;  // the launch is one cluster: gridDim.x == CB
    const int seg = (rank * nwarps + warp) * 32 * IPT;
    HC_MARK(0);
    if (threadIdx.x == 0) hc_mbar_init(mbar);

    IdT raw[IPT];
    lane_block_start<IdT, IPT, EPL>(raw, ids, seg, nk, smap, gmap, map_size, map_mode, wpos, warp * EW);
    __syncthreads();  // the map copy, the zero rows, the mbarrier's initialisation
    hc_cluster_arrive_relaxed();  // (hc_mbar_init fenced the initialisation for the cluster)
    HC_MARK(1);

    int key[IPT];
    int bad_warp = 0;
    lane_count<IdT, IPT>(raw, seg, nk, map_mode, faithful, smap, gmap, map_size, first, num_local, local_ids, key,
                         wpos + warp * EW, bad_warp);
    if (lane == 0) wbad[warp] = bad_warp;
    __syncthreads();  // every warp's counts
    hc_cluster_wait();  // every block's mbarrier is initialised
    HC_MARK(2);

    if (warp == 0) {
        int total[EPL];
        const int zero[EPL] = {};
        lane_column_positions<EPL>(wpos, nwarps, zero, total);
        const int bad = warp_sum(lane < nwarps ? wbad[lane] : 0);
        // Lane q < RW / 4 sends words 4q .. 4q + 3 of the row: the totals of experts 4q + i (from lane (4q + i) %
        // 32), then the invalid count and zeros. (One 16-byte message per piece: 4.1x fewer than a word each.)
        int word[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int w = 4 * lane + i;  // (past the row on lanes >= RW / 4, which send nothing)
            const int v = from_expert_lane<EPL>(total, w & (EW - 1));
            word[i] = w < EW ? v : w == EW ? bad : 0;
        }
        const int4 piece = make_int4(word[0], word[1], word[2], word[3]);
        int4* mine = reinterpret_cast<int4*>(peers + rank * RW) + lane;
#pragma unroll
        for (int r = 0; r < CB; ++r)
            if (lane < RW / 4) hc_store_async(mine, r, piece, mbar);
        if (lane == 0) hc_mbar_expect(mbar, CB * RW * 4);
        hc_mbar_wait(mbar);  // every block's row of `peers`
        __syncwarp();
        if (lane == 0) hc_mbar_inval(mbar);
    }
    HC_MARK(3);

    const bool aligned = block_m > 0;
    if (warp == 0) {
        int total[EPL], below[EPL];
#pragma unroll
        for (int j = 0; j < EPL; ++j) {
            total[j] = below[j] = 0;
#pragma unroll
            for (int r = 0; r < CB; ++r) {
                const int v = peers[r * RW + lane + 32 * j];
                total[j] += v;
                below[j] += r < rank ? v : 0;
            }
        }
        const int bad = warp_sum(lane < CB ? peers[lane * RW + EW] : 0);
        if (rank == 0) {
            if (lane == 0) invalid[0] = bad;
#pragma unroll
            for (int j = 0; j < EPL; ++j)
                if (lane + 32 * j < num_local) counts[lane + 32 * j] = total[j];
        }
        if (aligned) {
            int group[EPL];
            lane_groups<EPL>(total, block_m, tot, fblk, group);
#pragma unroll
            for (int j = 0; j < EPL; ++j) start[lane + 32 * j] = group[j] + below[j];
        }
    }
    if (!aligned) return;  // counts, local_ids and the invalid count are all there is without a layout
    __syncthreads();  // starts, totals, first blocks
    HC_MARK(4);

    lane_layout_writes<EPL>(tot, fblk, num_local, block_m, nk, capacity, sorted, block_ids, total_out);
    int next[EPL];  // experts lane + 32 j: position of this warp's next slot
#pragma unroll
    for (int j = 0; j < EPL; ++j) next[j] = start[lane + 32 * j] + wpos[warp * EW + lane + 32 * j];
    lane_place_chunks<IPT, EPL>(key, next, seg, sorted);
    HC_MARK(5);
}

// ---------------------------------------------------------------------------------------------------
// Multi-block path, per expert window: grid_count -> grid_scan -> grid_place. Tiles of HC_TILE
// consecutive slots, one block each.
//
// Workspace (int32, allocated with the outputs; `done` must be 0 before the first launch and is left at
// 0 by grid_scan, so buffers can be reused and the launches replayed in a CUDA graph):
//   tile_hist    [window * tiles]  counts of window expert k in tile g at [k * tiles + g], then (after
//                                  grid_scan) the exclusive prefix over tiles
//   tile_invalid [tiles]           invalid ids per tile (window 0 only)
//   gs           [num_local + 1]   absolute padded group start of every local expert, then the total
//   done         [1]               last-block counter of grid_scan
//   keys8        [nk] uint8        (num_local <= 254 only, else null) the layout key of every slot, 255 for
//                                  none: grid_place reads 1 byte per slot instead of 4 of local_ids
// ---------------------------------------------------------------------------------------------------

// Window 0 (lookup != 0): map the tile's ids, write local_ids (and keys8 when given) and the tile's invalid
// count; later windows re-read local_ids. Then count the tile's slots per window expert.
// Dynamic shared memory: [map: map_size if shared and lookup][hist: window][scratch: HC_SCRATCH].
template <typename IdT>
__global__ void __launch_bounds__(HC_GRID_THREADS)
grid_count(const IdT* __restrict__ ids, int nk, const int* __restrict__ gmap, int map_size, int map_mode,
           int faithful, int first, int num_local, int* __restrict__ local_ids, int lookup,
           int* __restrict__ tile_hist, int* __restrict__ tile_invalid, unsigned char* __restrict__ keys8, int e0,
           int wl, int window, int tiles) {
    extern __shared__ int smem[];
    const bool map_in_smem = lookup && map_mode == HC_MAP_SHARED;
    int* smap = smem;
    int* hist = smem + (map_in_smem ? map_size : 0);
    int* scratch = hist + window;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = blockIdx.x;
    const int seg = g * HC_TILE + warp * 32 * HC_GRID_IPT;

    int key[HC_GRID_IPT];
    int bad_here = 0;
    if (lookup) {
        IdT raw[HC_GRID_IPT];
#pragma unroll
        for (int c = 0; c < HC_GRID_IPT; ++c) {
            const int i = seg + c * 32 + lane;
            raw[c] = i < nk ? ids[i] : (IdT)0;
        }
        if (map_in_smem) hc_copy_map(smap, gmap, map_size);
        for (int k = tid; k < wl; k += blockDim.x) hist[k] = 0;
        if (tid == 0) scratch[0] = 0;
        __syncthreads();
        map_chunks<IdT, HC_GRID_IPT>(raw, seg, nk, map_mode, faithful, smap, gmap, map_size, first, num_local,
                                     local_ids, key, bad_here);
        if (keys8) {
#pragma unroll
            for (int c = 0; c < HC_GRID_IPT; ++c) {
                const int i = seg + c * 32 + lane;
                if (i < nk) keys8[i] = (unsigned char)(key[c] < 0 ? HC_NO_KEY8 : key[c]);
            }
        }
        bad_here = warp_sum(bad_here);
        if (lane == 0 && bad_here) atomicAdd(&scratch[0], bad_here);
    } else {
#pragma unroll
        for (int c = 0; c < HC_GRID_IPT; ++c) {
            const int i = seg + c * 32 + lane;
            key[c] = i < nk ? layout_key(local_ids[i], num_local) : -1;
        }
        for (int k = tid; k < wl; k += blockDim.x) hist[k] = 0;
        __syncthreads();
    }
#pragma unroll
    for (int c = 0; c < HC_GRID_IPT; ++c) {
        const int k = window_key(key[c], e0, wl);
        if (k >= 0) atomicAdd(&hist[k], 1);
    }
    __syncthreads();
    for (int k = tid; k < wl; k += blockDim.x) tile_hist[k * tiles + g] = hist[k];
    if (lookup && tid == 0) tile_invalid[g] = scratch[0];
}

// Block k < wl: exclusive scan of window expert k's tile counts (in place) and its total -> counts.
// The last block to finish (threadfence reduction) turns the window's counts into padded group starts
// gs[e0 .. e0 + wl] (gs[e0] is the previous window's end, 0 for the first window), sums the invalid
// counts (window 0), writes the total (last window) and re-arms `done`.
__global__ void __launch_bounds__(HC_SCAN_THREADS)
grid_scan(int* __restrict__ tile_hist, int tiles, const int* __restrict__ tile_invalid, int lookup,
          int* __restrict__ counts, int e0, int wl, int* __restrict__ gs, int* __restrict__ done,
          int* __restrict__ invalid, int* __restrict__ total_out, int block_m, int last_window) {
    __shared__ int scratch[HC_SCRATCH];
    __shared__ int flags[2];  // [0]: this block is the last; [1]: gs[e0] before this window's writes
    const int tid = threadIdx.x, k = blockIdx.x;
    if (k < wl) {
        const int total_k = block_exclusive_scan(tile_hist + (long long)k * tiles, tiles, scratch);
        if (tid == 0) counts[e0 + k] = total_k;
    }
    __threadfence();  // this block's counts and prefixes are visible device-wide before it reports done
    __syncthreads();
    if (tid == 0) flags[0] = atomicAdd(done, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!flags[0]) return;
    __threadfence();

    if (lookup) {  // sum of the per-tile invalid counts
        int sum = 0;
        for (int g = tid; g < tiles; g += blockDim.x) sum += __ldcg(tile_invalid + g);
        sum = warp_sum(sum);
        if ((tid & 31) == 0) scratch[tid >> 5] = sum;
        __syncthreads();
        if (tid == 0) {
            int all = 0;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) all += scratch[w];
            invalid[0] = all;
        }
        __syncthreads();
    }
    if (block_m > 0) {
        if (tid == 0) flags[1] = e0 == 0 ? 0 : __ldcg(gs + e0);  // read before gs[e0] is overwritten
        __syncthreads();
        const int base = flags[1];
        for (int j = tid; j < wl; j += blockDim.x) gs[e0 + j] = hc_round_up(__ldcg(counts + e0 + j), block_m);
        __syncthreads();
        const int window_total = block_exclusive_scan(gs + e0, wl, scratch);
        for (int j = tid; j < wl; j += blockDim.x) gs[e0 + j] += base;
        if (tid == 0) {
            gs[e0 + wl] = base + window_total;
            if (last_window) total_out[0] = base + window_total;
        }
    }
    if (tid == 0) *done = 0;  // every block has counted: re-arm for the next launch
}

// Place the tile's window slots: per-warp counts, tile-local stable positions staged in shared memory
// (so that the global writes of one expert group are contiguous), then copy out. Blocks take tiles in
// reverse order: the tiles grid_count wrote last are the likeliest to still be in L2. The whole grid
// also writes the window's padding entries and block ids, and (last window) the tail past the total.
// Dynamic shared memory: [cnt: 16 * window][delta: window][stage_slot: HC_TILE][stage_key: HC_TILE]
// [scratch: HC_SCRATCH].
__global__ void __launch_bounds__(HC_GRID_THREADS)
grid_place(const int* __restrict__ local_ids, const unsigned char* __restrict__ keys8, int nk, int num_local,
           const int* __restrict__ tile_hist,
           int tiles, const int* __restrict__ counts, const int* __restrict__ gs, int e0, int wl, int window,
           int* __restrict__ sorted, int* __restrict__ block_ids, int block_m, int capacity, int last_window) {
    extern __shared__ int smem[];
    const int nwarps = HC_GRID_THREADS / 32;
    int* cnt = smem;
    int* delta = cnt + nwarps * window;
    int* stage_slot = delta + window;
    int* stage_key = stage_slot + HC_TILE;
    int* scratch = stage_key + HC_TILE;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = tiles - 1 - (int)blockIdx.x;
    const int seg = g * HC_TILE + warp * 32 * HC_GRID_IPT;

    if (g >= 0 && wl > 0) {
        int key[HC_GRID_IPT];
#pragma unroll
        for (int c = 0; c < HC_GRID_IPT; ++c) {
            const int i = seg + c * 32 + lane;
            if (keys8) {
                const int k8 = i < nk ? keys8[i] : HC_NO_KEY8;
                key[c] = k8 == HC_NO_KEY8 ? -1 : k8;
            } else {
                key[c] = i < nk ? layout_key(local_ids[i], num_local) : -1;
            }
        }
        for (int j = tid; j < nwarps * window; j += blockDim.x) cnt[j] = 0;
        __syncthreads();
        warp_count<HC_GRID_IPT>(key, e0, wl, cnt + warp * window);
        __syncthreads();
        for (int k = tid; k < wl; k += blockDim.x) {
            int t = 0;
            for (int w = 0; w < nwarps; ++w) t += cnt[w * window + k];
            delta[k] = t;
        }
        __syncthreads();
        const int tile_n = block_exclusive_scan(delta, wl, scratch);  // delta[k]: tile-local group start
        for (int k = tid; k < wl; k += blockDim.x) {
            int run = delta[k];
            for (int w = 0; w < nwarps; ++w) {
                const int t = cnt[w * window + k];
                cnt[w * window + k] = run;
                run += t;
            }
            // global position = tile-local position + (group start + earlier tiles - tile-local start)
            delta[k] = gs[e0 + k] + tile_hist[k * tiles + g] - delta[k];
        }
        __syncthreads();
        warp_rank<HC_GRID_IPT>(key, e0, wl, cnt + warp * window, [&](int c, int k, int pos) {
            stage_slot[pos] = seg + c * 32 + lane;
            stage_key[pos] = k;
        });
        __syncthreads();
        for (int p = tid; p < tile_n; p += blockDim.x) sorted[p + delta[stage_key[p]]] = stage_slot[p];
    }

    // Grid-wide fills for this window (gs, counts come from grid_scan).
    const int gtid = blockIdx.x * blockDim.x + tid, gsize = gridDim.x * blockDim.x;
    for (int j = gtid; j < wl * block_m; j += gsize) {
        const int k = j / block_m, r = j - k * block_m;
        const int c = counts[e0 + k];
        if (r < hc_round_up(c, block_m) - c) sorted[gs[e0 + k] + c + r] = nk;
    }
    const int first_block = gs[e0] / block_m, end_block = gs[e0 + wl] / block_m;
    for (int b = first_block + gtid; b < end_block; b += gsize)
        block_ids[b] = e0 + upper_bound(gs + e0, wl + 1, b * block_m) - 1;
    if (last_window) {
        const int total = gs[e0 + wl];
        for (int p = total + gtid; p < capacity; p += gsize) sorted[p] = nk;
        const int blocks = capacity / block_m;
        for (int b = total / block_m + gtid; b < blocks; b += gsize) block_ids[b] = -1;
    }
}

// ---------------------------------------------------------------------------------------------------
// Single-pass multi-block path: grid_fused, ONE cooperative launch (all blocks co-resident) that maps,
// counts, computes the aligned group starts and places, with one or two grid-wide barriers in between.
// Used for num_local <= 1024 (one expert window); more local experts take the three-launch path above.
//
// Block g owns the slots [g * chunk, min((g + 1) * chunk, nk)), chunk a multiple of HC_TILE. Warp w of the
// block owns the contiguous segment [c0 + w * seg, c0 + (w + 1) * seg) of it (seg = chunk / 16, a multiple
// of 256 slots), in phase 1 and phase 3 alike, and takes its local slots in increasing slot order (its
// list, then the re-read batches), so the stable order is
//   (group start) + (expert's slots in lower blocks) + (in lower warps of this block)
//   + (in earlier entries of this warp's list or queue: lower slot indices),
// i.e. slots of one expert in increasing slot index: the same layout as block_preprocess, the three-launch
// path and the torch reference.
//
// Phases:
//   1. every warp maps its segment (HC_LOADS_IN_FLIGHT 16-byte id loads per lane issued before any use,
//      16-byte local_ids stores), counts its slots per expert into its own row of cnt (shared atomics on
//      the warp's own row) and appends its local slots, in slot order, to its list in shared memory
//      (list_cap uint32 entries: slot offset << 10 | key; 4 ballots per 128 slots say where each lane's
//      entries go). A group of slots that does not fit sets `over` and ends the list: the local slots from
//      there on are re-read in phase 3 (only when more than list_cap of a warp's seg slots are local; the
//      plan gives the lists as much shared memory as keeps the grid co-resident, up to a whole segment).
//      The block publishes its per-expert counts (cta_hist[k * G + g]) and invalid count (cta_invalid[g]);
//      with two_phase == 0 it also adds them to its group's sums (group_sums, see the workspace below).
//   barrier
//   2. two_phase == 0 (num_local * G small, chosen by plan.py): every block reads the group sums (the expert
//      totals, and its prefix over lower groups) and the counts of the lower blocks of its own group (the rest
//      of its prefix): (G / group_blocks + group_blocks) * num_local ints at most, from L2, where reading
//      all of cta_hist took 2.8-3.1 us at N*K = 8M (traces of runs 82 and 89); block 0 writes counts.
//      two_phase == 1: block g scans the columns k = g, g + G, ... (staged in `col`) and writes counts[k];
//      barrier; every block reads counts and its own column prefixes.
//      Each block then builds the padded group starts in shared memory; block 0 writes the total and the
//      invalid count. (The grid writes the padding entries and block ids at the very end, after phase 3.)
//   3. (block_m > 0) cnt[w][k] becomes the position of warp w's first slot of expert k (one __syncthreads),
//      then every warp ranks its local slots with no block barrier: it ranks its list 32 entries at a time
//      (bits + 1 ballots give the lanes of equal key, the group leader reads and advances the warp's row, a
//      __syncwarp per round orders it). Staged (stage_cap > 0): the positions are block-local, a slot at a
//      position below stage_cap goes to the shared `stage`, and after one __syncthreads the block copies
//      `stage` out to `sorted` in position order, so that each store instruction writes a run of one expert's
//      group. A stage entry (StageT) is either keyed, 32 bits: (offset in the block's chunk << 10) | key, or an
//      offset alone, 16 bits (chunks of up to 65536 slots), whose expert the copy-out finds from the block-local
//      starts: twice the entries in the same shared memory, for plans where keyed entries would not hold a
//      block's expected local slots (with every expert local at N*K = 8M, a third of them did not fit: 127 ->
//      102 us, runs 95-96), at some cost in the copy-out elsewhere (EP 1 at 1M: 26.0 -> 27.8 us). Slots at
//      positions past the stage (a block with more local slots than stage_cap) and every slot of an unstaged
//      plan are stored straight to `sorted`: one scattered 4-byte store per slot, up to 32 groups per
//      instruction, which took 10 / 27 / 59 us of N*K = 8M at 32 / 64 / 128 local experts (GPU run 79). (Until
//      run 94 a block whose local slots did not all fit stored every one of them straight.)
//      Past `over` it re-reads local_ids (written by the same warp: L1/L2 hits) HC_PLACE_BATCH
//      chunks of 32 slots at a time, compacts their local slots into the list's memory (one ballot per
//      chunk) behind the remainder (< 32) of the previous round, and ranks full rounds as they come. Before
//      its first round the warp writes a piece (HC_TAIL_PIECE entries, 16-byte streaming stores) of the tail
//      of `sorted` past the total, the next one of the warp's tail queue; after its copy-out it takes
//      pieces until its queue is empty.
//   (Until run 5 phase 3 went tile by tile with per-tile counts, a block scan, staging through shared
//   memory and 6 __syncthreads per 4096 slots: 4.6 issued instructions per slot at N*K = 8M. In run 6 it
//   still read every slot's uint16 key back from shared memory and compacted in phase 3: 11.8M of the 20.6M
//   instructions at 8M.)
//
// Workspace (int32, allocated with the outputs): cta_hist [num_local * G], cta_invalid [G],
// sync [HC_SYNC_STRIDE * (1 + HC_TAIL_QUEUES) + 2 * groups * num_local] (zero at allocation, 8-byte aligned):
// sync[0..1] the grid barrier's 64-bit arrival count (see grid_barrier); sync[HC_SYNC_STRIDE * (1 + q)] the next
// ticket of tail queue q (phase 3; block 0 sets each to its queue's number of warps before the first grid
// barrier), one 128-byte line each; then group_sums [2][groups][num_local] (groups = ceil(G / group_blocks);
// two_phase == 0 only): the per-expert counts of each group of group_blocks consecutive blocks, summed with
// atomics before the barrier.
// A launch uses half `parity` = (its first barrier's number) % 2, from the arrival count it reads at its start
// (a multiple of G between launches: fewer than G of its own blocks can have arrived), and zeroes the other half
// for the next launch on these buffers, which the previous launch used and has finished with: no memset node.
// Dynamic shared memory: [map: map_size if shared][cnt: 16 * wl][tot: wl][run: wl][gs: wl + 1][bst: wl + 1]
// [col: G][scratch: HC_SCRATCH][lists: 16 * list_cap uint32][stage: stage_cap StageT] (list_cap >=
// HC_PLACE_BUF with block_m, else 0; stage_cap 0 without a layout; StageT unsigned: keyed entries, chunks below
// 2^22 slots; unsigned short: offsets, chunks of at most 65536 slots; plan.stage_type).
// ---------------------------------------------------------------------------------------------------
#define HC_LOADS_IN_FLIGHT 4   // grid_fused phase 1: 16-byte id loads per lane issued before any is used
#define HC_HIST_BATCH 4        // grid_fused phase 2: counts loaded per thread before summing
#define HC_PLACE_BATCH 8       // grid_fused phase 3: 32-slot chunks of local_ids re-read per batch past `over`
#define HC_PLACE_BUF (32 * HC_PLACE_BATCH + 32)  // the least list_cap: a re-read batch + a carried remainder
#define HC_KEY_BITS 10         // list entry: (slot offset in the warp's segment << 10) | key (key < 1024)
#define HC_NO_OVER 0x7fffffff  // `over` while every local slot of the warp is in its list
#define HC_TAIL_QUEUES 32      // grid_fused phase 3: counters the tail pieces are handed out from
#define HC_SYNC_STRIDE 32      // ints between two counters of the workspace's sync words (a 128-byte line)

// The warps of a grid of grid_warps that serve tail queue q of grid_fused's phase 3 (grid warp gw serves queue
// gw % queues); 0 for a queue that no warp serves.
__device__ __forceinline__ int hc_queue_warps(int grid_warps, int q) {
    const int queues = min(HC_TAIL_QUEUES, grid_warps);
    return q < queues ? (grid_warps - q + queues - 1) / queues : 0;
}

// Spin-wait hint of grid_barrier's waiting thread.
__device__ __forceinline__ void hc_pause() { __nanosleep(32); }

// Grid-wide barrier of a co-resident grid (cooperative launch). *arrivals counts every block's arrival at
// every barrier over the life of the workspace (64 bits: it never wraps); a barrier ends when the count
// reaches the next multiple of the grid size. The grid size is fixed per workspace (plan.grid_blocks) and
// every launch passes all its barriers, so the count is a multiple of it whenever no launch is inside a
// barrier, and neither the host nor the kernel ever resets it: CUDA-graph replays need no memset node.
// The critical path is one atomic round trip and one poll. (The first version reset an arrival counter
// and bumped a generation word: a read of the generation before arriving, the atomic, the reset and a fence
// in a row, 1.4 us from the last block's arrival to the first release at every size, trace run 34.)
// The fences order every block's earlier writes before its arrival and the release before the data reads
// that follow (readers of other blocks' data use __ldcg, which bypasses the non-coherent L1).
__device__ __forceinline__ void grid_barrier(unsigned long long* arrivals) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned long long grid = gridDim.x;
        __threadfence();
        const unsigned long long before = atomicAdd(arrivals, 1ull);
        const unsigned long long release = before - before % grid + grid;
        if (before + 1 != release) {
            volatile unsigned long long* count = arrivals;
            while (*count < release) hc_pause();
        }
        __threadfence();
    }
    __syncthreads();
}

// 16-byte vector access to the ids: 4 int32 or 2 int64 ids per load, their local ids stored as int4/int2.
template <typename IdT> struct hc_vec;
template <> struct hc_vec<int> {
    static constexpr int n = 4;
    __device__ static void load(const int* p, int (&v)[4]) {
        const int4 x = __ldcs(reinterpret_cast<const int4*>(p));
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    }
    __device__ static void store(int* p, const int (&l)[4]) { *reinterpret_cast<int4*>(p) = make_int4(l[0], l[1], l[2], l[3]); }
};
template <> struct hc_vec<long long> {
    static constexpr int n = 2;
    __device__ static void load(const long long* p, long long (&v)[2]) {
        const longlong2 x = __ldcs(reinterpret_cast<const longlong2*>(p));
        v[0] = x.x; v[1] = x.y;
    }
    __device__ static void store(int* p, const int (&l)[2]) { *reinterpret_cast<int2*>(p) = make_int2(l[0], l[1]); }
};

// Place one 32-slot chunk of a warp's segment (grid_fused phase 3): k is the lane's key (-1: none), off its
// slot's offset in the block's chunk (slot c0 + off), row[k] the block-local position of the warp's next slot of
// expert k (only this warp touches its row). The lowest lane of each group of equal keys reads and advances
// row[k] and hands the start to its group by a shuffle; the __syncwarp orders this chunk's row update before
// the next chunk's read (leaders can differ). A position below `limit` (the stage's size; 0 unstaged) takes the
// slot's entry in the block's `stage` (keyed: off << HC_KEY_BITS | k; else off); one at or past it goes straight
// to sorted[position + dist[k]].
template <typename StageT>
__device__ __forceinline__ void warp_place(int k, int off, int bits, unsigned lower, int* row, StageT* stage,
                                           int limit, const int* dist, int c0, int* __restrict__ sorted) {
    const unsigned valid = __ballot_sync(HC_FULL_MASK, k >= 0);
    if (valid == 0) return;  // warp-uniform: no local slot in the chunk
    const unsigned peers = warp_peers_of(valid, k, bits);
    const unsigned below = peers & lower;
    int pos = 0;
    if (k >= 0 && below == 0) {
        pos = row[k];
        row[k] = pos + __popc(peers);
    }
    pos = __shfl_sync(HC_FULL_MASK, pos, __ffs(peers) - 1);
    if (k >= 0) {
        const int p = pos + __popc(below);
        if (p < limit)
            stage[p] = sizeof(StageT) == 4 ? (StageT)(((unsigned)off << HC_KEY_BITS) | (unsigned)k) : (StageT)off;
        else
            sorted[p + dist[k]] = c0 + off;
    }
    __syncwarp();
}

// Append this lane's V consecutive slots (warp-relative offsets off .. off + V - 1, keys k[], -1 = not
// local) to the warp's list of local slots, in slot order: the group of the warp's 32 * V slots (its first
// slot at offset off0) goes in whole or, if it does not fit in the `cap` entries, not at all and `over`
// becomes off0: every local slot from there on is left to phase 3's re-read of local_ids. An entry is
// (offset << HC_KEY_BITS) | key. Warp-uniform (every lane calls it with the same listed/over).
template <int V>
__device__ __forceinline__ void list_append(const int (&k)[V], int off, int off0, unsigned lower,
                                            unsigned* list, int cap, int& listed, int& over) {
    if (over != HC_NO_OVER) return;
    unsigned mine = 0;  // bit q: slot q of this lane is local
    int before = 0, total = 0;
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const unsigned b = __ballot_sync(HC_FULL_MASK, k[q] >= 0);
        mine |= (unsigned)(k[q] >= 0) << q;
        before += __popc(b & lower);
        total += __popc(b);
    }
    if (listed + total > cap) {
        over = off0;
        return;
    }
    unsigned* at = list + listed + before;  // this lane's first entry; its q-th local slot goes after the earlier ones
    const unsigned entry0 = ((unsigned)off << HC_KEY_BITS);
#pragma unroll
    for (int q = 0; q < V; ++q)
        if (k[q] >= 0) at[__popc(mine & ((1u << q) - 1u))] = entry0 + ((unsigned)q << HC_KEY_BITS) + (unsigned)k[q];
    listed += total;
}

// grid_fused phase 1 for one warp's segment [ws, we): map every slot, store local_ids (16-byte stores when
// vec_ok), count the slot in the warp's row (shared atomics on this warp's row only) and append its
// local slots to the warp's list (list_append; `over` = HC_NO_OVER disables the list). Returns this
// lane's count of ids that break the sentinel contract. MODE and FAITHFUL are constants so the per-slot
// code has no branch on them.
template <typename IdT, int MODE, int FAITHFUL>
__device__ __forceinline__ int fused_map_segment(const IdT* __restrict__ ids, int ws, int we, bool vec_ok,
                                                 const int* smap, const int* __restrict__ gmap, int map_size,
                                                 int first, int num_local, int* __restrict__ local_ids, int* row,
                                                 unsigned* list, int cap, int& listed, int& over) {
    const int lane = threadIdx.x & 31;
    const unsigned lower = hc_lanemask_lt();
    int bad_here = 0;
    auto take = [&](IdT raw, int& key) -> int {
        int bad;
        const int local = map_one(raw, MODE, FAITHFUL, smap, gmap, map_size, first, num_local, bad);
        bad_here += bad;
        key = layout_key(local, num_local);
        if (key >= 0) atomicAdd(&row[key], 1);
        return local;
    };
    constexpr int V = hc_vec<IdT>::n;
    int i_scalar = ws;
    if (vec_ok) {  // ws is a multiple of 256: 16-byte aligned when the bases are
        const int nvec = (we - ws) / V;
        // HC_LOADS_IN_FLIGHT independent 16-byte loads per lane before any use: 64 B per thread, 64 KiB
        // per SM with two blocks, about what Little's law asks of an SM for full HBM bandwidth.
        for (int v0 = 0; v0 < nvec; v0 += HC_LOADS_IN_FLIGHT * 32) {
            IdT a[HC_LOADS_IN_FLIGHT][V];
#pragma unroll
            for (int u = 0; u < HC_LOADS_IN_FLIGHT; ++u) {
                const int v = v0 + u * 32 + lane;
                if (v < nvec) hc_vec<IdT>::load(ids + ws + v * V, a[u]);
            }
#pragma unroll
            for (int u = 0; u < HC_LOADS_IN_FLIGHT; ++u) {
                const int v = v0 + u * 32 + lane;
                int k[V];
                if (v < nvec) {
                    int l[V];
#pragma unroll
                    for (int q = 0; q < V; ++q) l[q] = take(a[u][q], k[q]);
                    hc_vec<IdT>::store(local_ids + ws + v * V, l);
                } else {
#pragma unroll
                    for (int q = 0; q < V; ++q) k[q] = -1;
                }
                list_append<V>(k, v * V, (v0 + u * 32) * V, lower, list, cap, listed, over);
            }
        }
        i_scalar = ws + nvec * V;
    }
    for (int i0 = i_scalar; i0 < we; i0 += 32) {
        const int i = i0 + lane;
        int k[1] = {-1};
        if (i < we) local_ids[i] = take(ids[i], k[0]);
        list_append<1>(k, i - ws, i0 - ws, lower, list, cap, listed, over);
    }
    return bad_here;
}

template <typename IdT, typename StageT>
__global__ void __launch_bounds__(HC_GRID_THREADS, 2)
grid_fused(const IdT* __restrict__ ids, int nk, const int* __restrict__ gmap, int map_size, int map_mode, int faithful,
           int first, int num_local, int* __restrict__ local_ids, int* __restrict__ counts, int* __restrict__ invalid,
           int* __restrict__ sorted, int* __restrict__ block_ids, int* __restrict__ total_out, int block_m,
           int capacity, int* __restrict__ cta_hist, int* __restrict__ cta_invalid, unsigned* __restrict__ sync,
           int chunk, int list_cap, int two_phase, int stage_cap, int group_blocks) {
    extern __shared__ int smem[];
    const int wl = num_local;  // <= 1024, checked by plan.py
    constexpr int nwarps = HC_GRID_THREADS / 32;
    const int G = gridDim.x, me = blockIdx.x;
    int* smap = smem;
    int* cnt = smem + (map_mode == HC_MAP_SHARED ? map_size : 0);  // [nwarps][wl]
    int* tot = cnt + nwarps * wl;
    int* run = tot + wl;
    int* gs = run + wl;
    int* bst = gs + wl + 1;  // this block's slots per expert, then (staged) their block-local group starts
    int* col = bst + wl + 1;  // [G]: one column of cta_hist (two_phase)
    int* scratch = col + G;  // [0, 33): scans; [33]: invalid count; [35]: parity
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // [nwarps][list_cap]: every warp's list of its local slots (phase 1), then its queue (phase 3)
    unsigned* list = reinterpret_cast<unsigned*>(scratch + HC_SCRATCH) + warp * list_cap;
    StageT* stage = reinterpret_cast<StageT*>(reinterpret_cast<unsigned*>(scratch + HC_SCRATCH) + nwarps * list_cap);
    const int c0 = min(me * chunk, nk), c1 = min(c0 + chunk, nk);
    const int seg = chunk / nwarps;  // a multiple of 32 * HC_PLACE_BATCH (chunk is whole tiles)
    const int ws = min(c0 + warp * seg, c1), we = min(ws + seg, c1);  // this warp's segment
    const bool aligned = block_m > 0;
    unsigned long long* arrivals = reinterpret_cast<unsigned long long*>(sync);
    const int gb = max(group_blocks, 1), groups = (G + gb - 1) / gb, grp = me / gb;  // group_blocks: 0 if two_phase
    int* group_sums = reinterpret_cast<int*>(sync) + HC_SYNC_STRIDE * (1 + HC_TAIL_QUEUES);  // [2][groups][wl]

    // ---- phase 1: map, local_ids, per-warp counts, per-warp lists of local slots ------------------
    HC_MARK(0);
    // The launch's half of group_sums (its load overlaps the map copy's)
    const unsigned long long arrived = tid == 0 && !two_phase ? __ldcg(arrivals) : 0ull;
    if (map_mode == HC_MAP_SHARED) hc_copy_map(smap, gmap, map_size);
    for (int j = tid; j < nwarps * wl; j += blockDim.x) cnt[j] = 0;
    if (tid == 0) {
        scratch[33] = 0;
        scratch[35] = (int)(arrived / (unsigned long long)G & 1ull);
    }
    __syncthreads();
    HC_MARK(1);
    int* row = cnt + warp * wl;
    int listed = 0;                            // entries in this warp's list (warp-uniform)
    int over = aligned ? HC_NO_OVER : 0;       // offset from which the list is full (no list without a layout)
    // The map mode and faithful flag are template constants of the per-slot loop (a runtime mode cost
    // four branches per slot).
    const bool vec_ok = ((reinterpret_cast<unsigned long long>(ids) | reinterpret_cast<unsigned long long>(local_ids))
                         & 15ull) == 0;
#define HC_PHASE1(MODE, FAITHFUL) \
    fused_map_segment<IdT, MODE, FAITHFUL>(ids, ws, we, vec_ok, smap, gmap, map_size, first, num_local, local_ids, \
                                           row, list, list_cap, listed, over)
    int bad_here;
    if (map_mode == HC_MAP_SHARED) bad_here = faithful ? HC_PHASE1(HC_MAP_SHARED, 1) : HC_PHASE1(HC_MAP_SHARED, 0);
    else if (map_mode == HC_MAP_GLOBAL) bad_here = faithful ? HC_PHASE1(HC_MAP_GLOBAL, 1) : HC_PHASE1(HC_MAP_GLOBAL, 0);
    else bad_here = HC_PHASE1(HC_MAP_NONE, 0);
#undef HC_PHASE1
    HC_MARK(2);
    bad_here = warp_sum(bad_here);
    if (lane == 0 && bad_here) atomicAdd(&scratch[33], bad_here);
    __syncthreads();
    HC_MARK(3);
    const int parity = scratch[35];
    for (int k = tid; k < wl; k += blockDim.x) {
        int t = 0;
#pragma unroll
        for (int w = 0; w < nwarps; ++w) t += cnt[w * wl + k];
        cta_hist[k * G + me] = t;
        bst[k] = t;
        if (!two_phase) {
            if (t) atomicAdd(group_sums + (parity * groups + grp) * wl + k, t);
            if (me < groups) group_sums[((parity ^ 1) * groups + me) * wl + k] = 0;  // for the next launch
        }
    }
    if (tid == 0) cta_invalid[me] = scratch[33];
    // The previous launch on these buffers has ended, and no block takes a tail piece before this barrier. Each
    // queue's counter starts at the queue's number of warps (see phase 3).
    if (me == 0 && tid < HC_TAIL_QUEUES) sync[HC_SYNC_STRIDE * (1 + tid)] = hc_queue_warps(G * nwarps, tid);
    HC_MARK(4);
    grid_barrier(arrivals);
    HC_MARK(5);

    // ---- phase 2: expert totals, this block's prefix, group starts, fills --------------------------
    if (me == 0 && tid < 32) {  // the invalid count (read by every mode; written once)
        int sum = 0;
        for (int g = lane; g < G; g += 32) sum += __ldcg(cta_invalid + g);
        sum = warp_sum(sum);
        if (lane == 0) invalid[0] = sum;
    }
    if (!two_phase) {
        for (int k = tid; k < wl; k += blockDim.x) tot[k] = run[k] = 0;
        __syncthreads();
        // Items [0, groups * wl): the launch's group sums (group q = j / wl, expert k = j % wl), to the totals and,
        // below this block's group, to its prefix; then the counts of the `lower` blocks of its own group below
        // it (expert k = i / lower). Each thread issues HC_HIST_BATCH loads before it sums any: one L2 round trip.
        const int* sums = group_sums + parity * groups * wl;
        const int lower = me - grp * gb, n_sums = groups * wl, items = n_sums + lower * wl;
        for (int j0 = tid; j0 < items; j0 += HC_HIST_BATCH * blockDim.x) {
            int v[HC_HIST_BATCH];
#pragma unroll
            for (int u = 0; u < HC_HIST_BATCH; ++u) {
                const int j = j0 + u * blockDim.x, i = j - n_sums;
                v[u] = j < n_sums ? __ldcg(sums + j)
                                  : j < items ? __ldcg(cta_hist + (i / lower) * G + grp * gb + i % lower) : 0;
            }
#pragma unroll
            for (int u = 0; u < HC_HIST_BATCH; ++u) {
                const int j = j0 + u * blockDim.x;
                if (j < n_sums) {
                    const int k = j % wl;
                    atomicAdd(&tot[k], v[u]);
                    if (j / wl < grp) atomicAdd(&run[k], v[u]);
                } else if (j < items) {
                    atomicAdd(&run[(j - n_sums) / lower], v[u]);
                }
            }
        }
        __syncthreads();
        if (me == 0)
            for (int k = tid; k < wl; k += blockDim.x) counts[k] = tot[k];
    } else {
        for (int k = me; k < wl; k += G) {
            for (int g = tid; g < G; g += blockDim.x) col[g] = __ldcg(cta_hist + k * G + g);
            __syncthreads();
            const int total_k = block_exclusive_scan(col, G, scratch);
            for (int g = tid; g < G; g += blockDim.x) cta_hist[k * G + g] = col[g];
            if (tid == 0) counts[k] = total_k;
            __syncthreads();  // col is rewritten by the next column
        }
        grid_barrier(arrivals);
        for (int k = tid; k < wl; k += blockDim.x) {
            tot[k] = __ldcg(counts + k);
            run[k] = __ldcg(cta_hist + k * G + me);
        }
        __syncthreads();
    }
    HC_MARK(6);
    if (!aligned) return;
    // The padded group starts (gs, gs[wl] the total) and the block-local starts of its local slots (bst, their
    // count in bst[wl]); the block stages whenever it has a stage. Then cnt[w][k] (warp w's slots
    // of expert k) becomes the position of warp w's first slot of k: (staged) the block-local start or (unstaged) the
    // group start + this block's lower-block prefix; + lower warps' counts. run[k] becomes the distance from
    // such a position of expert k to its place in `sorted` (0 unstaged).
    const bool staged = stage_cap > 0;
    auto positions = [&](int k) {
        int c[nwarps];
#pragma unroll
        for (int w = 0; w < nwarps; ++w) c[w] = cnt[w * wl + k];
        const int place = gs[k] + run[k];
        int r = staged ? bst[k] : place;
        run[k] = place - r;
#pragma unroll
        for (int w = 0; w < nwarps; ++w) {
            cnt[w * wl + k] = r;
            r += c[w];
        }
    };
    if (wl <= 32) {  // warp 0 alone, lane k for expert k: two shuffle scans, no block barrier until the end
        if (warp == 0) {
            const int padded = lane < wl ? hc_round_up(tot[lane], block_m) : 0;
            const int mine = lane < wl ? bst[lane] : 0;
            const int padded_incl = warp_inclusive_scan(padded), mine_incl = warp_inclusive_scan(mine);
            const int all_local = __shfl_sync(HC_FULL_MASK, mine_incl, 31);
            if (lane < wl) {
                gs[lane] = padded_incl - padded;
                bst[lane] = mine_incl - mine;
                positions(lane);
            }
            if (lane == 31) {
                gs[wl] = padded_incl;
                bst[wl] = all_local;
            }
        }
    } else {  // block scans (3 block barriers each)
        for (int k = tid; k < wl; k += blockDim.x) gs[k] = hc_round_up(tot[k], block_m);
        __syncthreads();
        const int padded_total = block_exclusive_scan(gs, wl, scratch);
        const int all_local = staged ? block_exclusive_scan(bst, wl, scratch) : 0;
        if (tid == 0) {
            gs[wl] = padded_total;
            bst[wl] = all_local;
        }
        for (int k = tid; k < wl; k += blockDim.x) positions(k);
    }
    __syncthreads();  // from here on every warp works alone (staged: up to the copy-out)
    const int total = gs[wl], block_local = bst[wl];
    if (me == 0 && tid == 0) total_out[0] = total;
    HC_MARK(7);
    // The tail of `sorted` past the total (most of it when few slots are local: 29 of the 103 MB the
    // benchmark moves at N*K = 8M) is cut into pieces of HC_TAIL_PIECE entries from `head` (the first
    // 16-byte aligned entry past the total; the grid's first warp writes the < 4 entries before it), and
    // the pieces into `queues` runs of consecutive pieces: HC_TAIL_QUEUES, or one per warp on a grid of fewer
    // warps (one block), so that every queue is served. Grid warp gw serves queue gw % queues (with 32 queues,
    // warp gw % 16 of every other block: spread over all SMs) and takes that queue's pieces from its counter,
    // which block 0 set to the queue's number of warps, until the queue is empty. Where the queue has at least a
    // piece per warp, the i-th warp of the queue (gw / queues) takes piece i without asking and the counter's
    // tickets are the pieces past those; where it has fewer, a piece is a ticket less the number of warps, the
    // first warps to ask get them, and the grid's fastest warps write the short tail. (Asking for every first
    // piece put a round trip before any store: a 33.5 MB fill by pieces took 1.4 us longer that way than a
    // grid-stride fill in a CUDA graph, GPU run 116. Taking first pieces unasked where a queue has fewer pieces
    // than warps concentrated the tail on the grid's first blocks: N*K = 262144 3-7% slower, run 117.)
    // The warp writes its first piece before it ranks (its stores stream to memory while it ranks), the rest
    // after its copy-out. (A piece per ranking round slowed the ranking behind the store queue: 8M was 8% slower
    // at EP 4, where a warp ranks twice as many slots; taking none before ranking left the tail last at 1M,
    // where the grid has more warps than pieces: GPU runs 108-109.) The counters balance the grid: with a fixed
    // slice per warp, the blocks of some SMs took 17 us for the slice that others wrote in 3.5 (N*K = 8M, trace
    // run 35). One counter for the whole grid was slower still (run 36: 14K requests at one address, phase 3
    // took 25 us instead of 16).
    // Each request is issued a piece ahead, so its round trip overlaps the work. The tail never overlaps a
    // placement or padding write (those are below the total). capacity < 2^31 (plan.py): int arithmetic.
    const int head = min(capacity, total + (int)(((16u - ((unsigned)reinterpret_cast<unsigned long long>(sorted + total)
                                                           & 15u)) & 15u) >> 2));
    if (me == 0 && warp == 0 && lane < head - total) sorted[total + lane] = nk;
    const int tail_pieces = (capacity - head + HC_TAIL_PIECE - 1) / HC_TAIL_PIECE;
    const int queues = min(HC_TAIL_QUEUES, G * nwarps);
    const int queue = (me * nwarps + warp) % queues;
    const int per_queue = (tail_pieces + queues - 1) / queues;
    const int queue_first = queue * per_queue, queue_pieces = max(0, min(per_queue, tail_pieces - queue_first));
    unsigned* tail_next = sync + HC_SYNC_STRIDE * (1 + queue);
    const int queue_warps = hc_queue_warps(G * nwarps, queue);
    const int ticket_base = queue_pieces >= queue_warps ? 0 : queue_warps;  // a piece is a ticket less this
    // lane 0's is the queue's piece this warp writes next
    int requested = ticket_base == 0 ? (me * nwarps + warp) / queues
                                     : lane == 0 ? (int)atomicAdd(tail_next, 1u) - ticket_base : 0;
    // Write the piece requested last (if the queue had one left) and request the next; false when it had none.
    auto fill_tail_piece = [&]() -> bool {
        const int piece = __shfl_sync(HC_FULL_MASK, requested, 0);
        if (piece >= queue_pieces) return false;
        if (lane == 0) requested = (int)atomicAdd(tail_next, 1u) - ticket_base;
        const int p = head + (queue_first + piece) * HC_TAIL_PIECE;
        hc_fill_piece(sorted, p, min(capacity, p + HC_TAIL_PIECE), nk);
        return true;
    };
    const int bits = key_bits(wl);
    const unsigned lower = hc_lanemask_lt();
    const int seg_in_chunk = ws - c0;  // list entry offset -> offset in the block's chunk
    // The list holds the warp's first `listed` local slots in slot order; local slots from offset `over`
    // on (only when the list filled up) are re-read from local_ids, HC_PLACE_BATCH chunks of 32 at a time,
    // compacted into the list's memory (now a queue: one ballot per chunk) behind a carried remainder.
    // Full rounds of 32 entries are ranked as they come; the last remainder (< 32) at the end.
    int queued = listed;
    int next = min(over, we - ws);  // offset of the next slot to re-read
    bool tail_left = fill_tail_piece();  // warp-uniform: its queue may have pieces left for after the copy-out
    for (;;) {
        const bool more = next < we - ws;
        const int ranked = more ? queued & ~31 : queued;
        for (int r = 0; r < ranked; r += 32) {
            const int e = r + lane;
            const unsigned entry = e < queued ? list[e] : 0u;
            warp_place(e < queued ? (int)(entry & ((1u << HC_KEY_BITS) - 1)) : -1,
                       seg_in_chunk + (int)(entry >> HC_KEY_BITS), bits, lower, row, stage, stage_cap, run, c0,
                       sorted);
        }
        queued -= ranked;
        if (!more) break;
        if (queued > 0 && ranked > 0) {  // move the remainder (< 32, past the ranked rounds) to the front
            const unsigned e = lane < queued ? list[ranked + lane] : 0u;
            __syncwarp();
            if (lane < queued) list[lane] = e;
        }
        int key[HC_PLACE_BATCH];
#pragma unroll
        for (int c = 0; c < HC_PLACE_BATCH; ++c) {  // independent loads first
            const int i = ws + next + c * 32 + lane;
            key[c] = i < we ? layout_key(local_ids[i], num_local) : -1;  // written by this warp in phase 1
        }
        __syncwarp();  // the remainder is in place before the appends
#pragma unroll
        for (int c = 0; c < HC_PLACE_BATCH; ++c) {
            const unsigned valid = __ballot_sync(HC_FULL_MASK, key[c] >= 0);
            if (key[c] >= 0)
                list[queued + __popc(valid & lower)] = ((unsigned)(next + c * 32 + lane) << HC_KEY_BITS) | key[c];
            queued += __popc(valid);
        }
        next += 32 * HC_PLACE_BATCH;
        __syncwarp();  // the queue is visible to every lane
    }
    HC_MARK(8);
    if (staged && sizeof(StageT) == 4) {  // keyed: consecutive threads, consecutive places of a group
        __syncthreads();
        for (int p = tid; p < min(block_local, stage_cap); p += blockDim.x) {
            const unsigned e = stage[p];
            sorted[p + run[e & ((1u << HC_KEY_BITS) - 1)]] = c0 + (int)(e >> HC_KEY_BITS);
        }
    } else if (staged) {
        // Offsets: each warp copies an equal run of the stage, expert by expert. The expert of position p is the k
        // with bst[k] <= p < bst[k + 1] (bst[wl] = block_local): the warp finds the one of its first position by
        // ballots (the last k with bst[k] <= p, 32 experts a round), then copies one expert's part at a time
        // (consecutive lanes, consecutive places of its group). (Per lane, a binary search and a walk were 2-3%
        // slower at N*K = 8M, run 96.)
        __syncthreads();
        const int n = min(block_local, stage_cap);
        const int per = (n + 32 * nwarps - 1) / (32 * nwarps) * 32;
        int p = min(n, warp * per);
        const int p1 = min(n, p + per);
        int k = 0;
        for (int k0 = 0; k0 < wl && p < p1; k0 += 32) {
            const unsigned starts_by = __ballot_sync(HC_FULL_MASK, k0 + lane < wl && bst[k0 + lane] <= p);
            if (starts_by) k = k0 + 31 - __clz(starts_by);
        }
        for (; p < p1; ++k) {  // warp-uniform
            const int end = min(p1, bst[k + 1]), dist = run[k];
            for (int q = p + lane; q < end; q += 32) sorted[q + dist] = c0 + (int)stage[q];
            p = end;
        }
    }
    HC_MARK(9);
    while (tail_left) tail_left = fill_tail_piece();  // the rest of this warp's queue, after its copy-out
    HC_MARK(10);

    // ---- the grid's padding entries and block ids (gs and tot are still this block's, untouched since
    // the last __syncthreads). Nothing in the kernel reads them, so they come last: before run 7 they sat
    // between the scan and the placement, where every warp of the grid waited on this cold, rarely taken
    // code (instruction-cache misses at each branch over it: ~3% of the run-6 stall samples at 8M).
    const int gtid = me * blockDim.x + tid, gsize = G * blockDim.x;
    for (int j = gtid; j < wl * block_m; j += gsize) {  // < block_m padding entries per group
        const int k = j / block_m, r = j - k * block_m;
        if (r < hc_round_up(tot[k], block_m) - tot[k]) sorted[gs[k] + tot[k] + r] = nk;
    }
    for (int b = gtid; b < total / block_m; b += gsize) block_ids[b] = upper_bound(gs, wl + 1, b * block_m) - 1;
    hc_fill(block_ids, total / block_m, capacity / block_m, -1, gtid, gsize);
    HC_MARK(11);
}

// An empty kernel, launched by the benchmark to measure the launch floor in the same process. (One
// argument, so that its launch packs a parameter like every real one.)
extern "C" __global__ void empty_kernel(int) {}

#ifdef HOSTCORE_NVCC_CHECK
// The instantiations jit.py asks NVRTC for, so that nvcc -c reports their resources. Every single-launch
// kernel starts with the same parameters (HC_PARAMS: ids ... capacity); some take a few ints more.
#define HC_PARAMS(IdT) \
    const IdT*, int, const int*, int, int, int, int, int, int*, int*, int*, int*, int*, int*, int, int
template __global__ void block_preprocess<int, 1, 1>(HC_PARAMS(int), int, int, int);
template __global__ void block_preprocess<int, 4, 1>(HC_PARAMS(int), int, int, int);
template __global__ void block_preprocess<int, 4, 4>(HC_PARAMS(int), int, int, int);
template __global__ void block_preprocess<int, 8, 1>(HC_PARAMS(int), int, int, int);
template __global__ void block_preprocess<int, 8, 8>(HC_PARAMS(int), int, int, int);
template __global__ void block_preprocess<int, 16, 1>(HC_PARAMS(int), int, int, int);
template __global__ void block_preprocess<int, 16, 16>(HC_PARAMS(int), int, int, int);
template __global__ void block_preprocess<long long, 1, 1>(HC_PARAMS(long long), int, int, int);
template __global__ void block_preprocess<long long, 4, 1>(HC_PARAMS(long long), int, int, int);
template __global__ void block_preprocess<long long, 4, 4>(HC_PARAMS(long long), int, int, int);
template __global__ void block_preprocess<long long, 8, 1>(HC_PARAMS(long long), int, int, int);
template __global__ void block_preprocess<long long, 8, 8>(HC_PARAMS(long long), int, int, int);
template __global__ void block_preprocess<long long, 16, 16>(HC_PARAMS(long long), int, int, int);
template __global__ void warp_preprocess<int, 1>(HC_PARAMS(int));
template __global__ void warp_preprocess<int, 4>(HC_PARAMS(int));
template __global__ void warp_preprocess<int, 16>(HC_PARAMS(int));
template __global__ void warp_preprocess<long long, 1>(HC_PARAMS(long long));
template __global__ void warp_preprocess<long long, 4>(HC_PARAMS(long long));
template __global__ void warp_preprocess<long long, 16>(HC_PARAMS(long long));
template __global__ void lane_preprocess<int, 1, 1>(HC_PARAMS(int));
template __global__ void lane_preprocess<int, 1, 2>(HC_PARAMS(int));
template __global__ void lane_preprocess<int, 4, 1>(HC_PARAMS(int));
template __global__ void lane_preprocess<int, 4, 2>(HC_PARAMS(int));
template __global__ void lane_preprocess<long long, 1, 1>(HC_PARAMS(long long));
template __global__ void lane_preprocess<long long, 1, 2>(HC_PARAMS(long long));
template __global__ void lane_preprocess<long long, 4, 1>(HC_PARAMS(long long));
template __global__ void lane_preprocess<long long, 4, 2>(HC_PARAMS(long long));
template __global__ void block_lane_preprocess<int, 1, 1>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<int, 1, 2>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<int, 4, 1>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<int, 4, 2>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<int, 8, 1>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<int, 8, 2>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<int, 16, 1>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<int, 16, 2>(HC_PARAMS(int), int);
template __global__ void block_lane_preprocess<long long, 1, 1>(HC_PARAMS(long long), int);
template __global__ void block_lane_preprocess<long long, 1, 2>(HC_PARAMS(long long), int);
template __global__ void block_lane_preprocess<long long, 4, 1>(HC_PARAMS(long long), int);
template __global__ void block_lane_preprocess<long long, 4, 2>(HC_PARAMS(long long), int);
template __global__ void block_lane_preprocess<long long, 8, 1>(HC_PARAMS(long long), int);
template __global__ void block_lane_preprocess<long long, 8, 2>(HC_PARAMS(long long), int);
template __global__ void block_lane_preprocess<long long, 16, 1>(HC_PARAMS(long long), int);
template __global__ void block_lane_preprocess<long long, 16, 2>(HC_PARAMS(long long), int);
// cluster_lane_preprocess for clusters of CB blocks (plan.CLUSTER_SIZES), every ipt and experts per lane.
#define HC_CLUSTER_INSTANCES(CB) \
    template __global__ void cluster_lane_preprocess<int, 1, 1, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<int, 1, 2, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<int, 2, 1, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<int, 2, 2, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<int, 4, 1, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<int, 4, 2, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<int, 8, 1, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<int, 8, 2, CB>(HC_PARAMS(int)); \
    template __global__ void cluster_lane_preprocess<long long, 1, 1, CB>(HC_PARAMS(long long)); \
    template __global__ void cluster_lane_preprocess<long long, 1, 2, CB>(HC_PARAMS(long long)); \
    template __global__ void cluster_lane_preprocess<long long, 2, 1, CB>(HC_PARAMS(long long)); \
    template __global__ void cluster_lane_preprocess<long long, 2, 2, CB>(HC_PARAMS(long long)); \
    template __global__ void cluster_lane_preprocess<long long, 4, 1, CB>(HC_PARAMS(long long)); \
    template __global__ void cluster_lane_preprocess<long long, 4, 2, CB>(HC_PARAMS(long long)); \
    template __global__ void cluster_lane_preprocess<long long, 8, 1, CB>(HC_PARAMS(long long)); \
    template __global__ void cluster_lane_preprocess<long long, 8, 2, CB>(HC_PARAMS(long long));
HC_CLUSTER_INSTANCES(8)
HC_CLUSTER_INSTANCES(16)
#undef HC_CLUSTER_INSTANCES
template __global__ void grid_count<int>(const int*, int, const int*, int, int, int, int, int, int*, int, int*, int*,
                                         unsigned char*, int, int, int, int);
template __global__ void grid_count<long long>(const long long*, int, const int*, int, int, int, int, int, int*, int,
                                               int*, int*, unsigned char*, int, int, int, int);
#define HC_FUSED_INSTANCE(IdT, StageT) \
    template __global__ void grid_fused<IdT, StageT>(HC_PARAMS(IdT), int*, int*, unsigned*, int, int, int, int, int);
HC_FUSED_INSTANCE(int, unsigned short)
HC_FUSED_INSTANCE(int, unsigned)
HC_FUSED_INSTANCE(long long, unsigned short)
HC_FUSED_INSTANCE(long long, unsigned)
#undef HC_FUSED_INSTANCE
#undef HC_PARAMS
#endif
